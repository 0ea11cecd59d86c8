"""A long fuzzing run against the real daemon: the hypothesis cases of tests/helpers/fuzz.py
(every route, hostile bodies and headers, pipelining) and schemathesis on OpenAI's published
API description. Prints cases tried and failures, and whether any process restarted.

    python bench/fuzz.py [--examples 5000] [--spec-examples 200] [--seed 1]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from helpers.daemon import Daemon  # noqa: E402
from helpers.fuzz import MODEL, case, exchange, problems  # noqa: E402
from tidegate.core.llm.demo_model import make_demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=5000)
    ap.add_argument("--spec-examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="tidegate-fuzz-"))
    model = make_demo(str(tmp / "demo.gguf"))
    d = Daemon(tmp, workers=2, events={"views": [{"name": "n", "kind": "count"}]},
               inference={"enabled": True, "models": [{"name": MODEL, "path": model, "n_ctx": 256, "max_seqs": 4,
                                                       "embeddings": True}]}).start()
    pids = {r["id"]: r["pid"] for r in d.admin_json("workers")["body"]}
    tried, failures = [0], []
    try:
        @seed(args.seed)
        @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case())
        def one(c):
            tried[0] += 1
            bad = problems(exchange(d.port, c[0]))
            if bad:
                failures.append((c[0][:300], bad))
        t0 = time.monotonic()
        one()
        print(f"hypothesis: {tried[0]} cases in {time.monotonic() - t0:.0f} s, {len(failures)} failures")
        for data, bad in failures[:10]:
            print("  ", bad, data)
        spec = ROOT.parent / "shared" / "specs" / "openai-subset.json"
        if spec.exists():
            r = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", str(spec), "--url", f"http://127.0.0.1:{d.port}/v1",
                                "--checks", "not_a_server_error", "--max-examples", str(args.spec_examples),
                                "--seed", str(args.seed), "--report-dir", str(tmp / "reports")],
                               capture_output=True, text=True, env=dict(os.environ, NO_COLOR="1"))
            summary = [line for line in r.stdout.splitlines() if "generated" in line or "failed" in line.lower()]
            print("schemathesis:", "; ".join(s.strip() for s in summary) or r.stdout[-500:], f"(exit {r.returncode})")
        now = {r["id"]: r["pid"] for r in d.admin_json("workers")["body"]}
        print(f"processes restarted: {sum(1 for k in pids if now.get(k) != pids[k])}, "
              f"respawns: {d.admin_json('status')['body']['respawns']}")
    finally:
        d.stop()


if __name__ == "__main__":
    main()
