"""Fair shares inside one class: two background tenants, one at 10x the other's rate.

Runs four open-loop tests (tidegate loadtest) against fresh daemons with the LLM demo model:
the light tenant alone; light + heavy with fair shares (inference.fair_share = true, the
default: virtual token counters); the same with inference.fair_decode = 1 (each tenant decodes one
sequence per step while both run); light + heavy in arrival order (fair_share = false). Shedding
is off for the class (overload.shed background = never) so that only scheduling differs.
llama.cpp runs one thread (sized for a 2-core box: its threads spin, and the ingress worker and
the load generator need the other core). Target from the overload issue: the light tenant's p99 with the heavy one beside it within 1.5x
of its p99 alone.

    python bench/fairness.py [--duration 60] [--light 0.5] [--heavy 5.0]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers as S  # noqa: E402

from tidegate.core.base.config import toml_value  # noqa: E402
from tidegate.core.state.auth import hash_key  # noqa: E402

LIGHT, HEAVY = "sk-fair-light-0123456789", "sk-fair-heavy-0123456789"


def stream(name: str, key: str, rate: float) -> str:
    # the same prompts for both tenants: with a random model, a prompt decides how soon it stops
    body = ('{"model": "tidegate-demo", "messages": [{"role": "user", "content": "Question ${n}, please answer '
            'at length."}], "max_tokens": 64, "temperature": 0}')
    return (f'[[streams]]\nname = "{name}"\nclass = "background"\nrate = {rate}\nfollows_profile = false\n'
            f'method = "POST"\npath = "/v1/chat/completions"\n'
            f'headers = {{Authorization = "Bearer {key}", Content-Type = "application/json"}}\n'
            f"body = ['{body}']\nvars = {{n = [0, 100000000]}}\n")


def run(tmp: str, name: str, fair: bool, with_heavy: bool, args, fair_decode: int = 0) -> dict:
    sub = os.path.join(tmp, name)
    os.makedirs(sub)
    port = S.free_port()
    keys = [{"key_sha256": hash_key(LIGHT), "tenant": "light", "name": "light", "class": "background"},
            {"key_sha256": hash_key(HEAVY), "tenant": "heavy", "name": "heavy", "class": "background"}]
    conf = os.path.join(sub, "tidegate.toml")
    with open(conf, "w") as f:
        f.write(f'[server]\nbind = "127.0.0.1:{port}"\nworkers = 1\nrun_dir = "{sub}/run"\ndata_dir = "{sub}/data"\n'
                f"[inference]\nmax_seqs = 4\nthreads = 1\nfair_share = {toml_value(fair)}\nfair_decode = {fair_decode}\n"
                "queue_max = {critical = 256, standard = 256, background = 100000}\n"
                f"[auth]\nkeys = {toml_value(keys)}\n[cache]\nexact_enabled = false\nsemantic_enabled = false\n"
                '[overload]\nshed = {critical = "never", standard = "never", background = "never"}\n'
                '[log]\nlevel = "warning"\n')
    scen = os.path.join(sub, "scenario.toml")
    with open(scen, "w") as f:
        f.write(f'url = "http://127.0.0.1:{port}"\nduration = {args.duration}\ntimeout = 120.0\n'
                f'phases = {{steady = [10, {args.duration}]}}\n' + stream("light", LIGHT, args.light)
                + (stream("heavy", HEAVY, args.heavy) if with_heavy else ""))
    srv = S.Server("tidegate", [sys.executable, "-m", "tidegate.workers.cli", "serve", "--config", conf], port, sub)
    srv.start()
    try:
        return S.loadtest(srv, scen, sub)
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=60)
    ap.add_argument("--light", type=float, default=0.5, help="light tenant's requests/s")
    ap.add_argument("--heavy", type=float, default=5.0, help="heavy tenant's requests/s (10x by default)")
    args = ap.parse_args()
    S.raise_nofile()
    tmp = tempfile.mkdtemp(prefix="tidegate-fair-")
    alone = run(tmp, "alone", True, False, args)
    fair = run(tmp, "fair", True, True, args)
    steps = run(tmp, "fair-decode", True, True, args, fair_decode=1)
    fifo = run(tmp, "fifo", False, True, args)
    print("the light tenant over the steady phase (ms)")
    base = alone["streams"]["light"]["phases"]["steady"]["p99_ms"]
    for label, r in (("alone", alone), ("beside heavy, fair shares", fair), ("  + fair_decode 1", steps),
                     ("beside heavy, arrival order", fifo)):
        w = r["streams"]["light"]["phases"]["steady"]
        h = r["streams"].get("heavy", {}).get("phases", {}).get("steady")
        print(f"  {label:28} p50 {w['p50_ms']:9.1f}  p99 {w['p99_ms']:9.1f}  ({w['p99_ms'] / base:.2f}x alone)  "
              f"requests {w['requests']}" + (f"   heavy p50 {h['p50_ms']:.0f} p99 {h['p99_ms']:.0f}" if h else ""))
    print("target: beside heavy with fair shares <= 1.5x alone (heavy's p50/p99: what each policy costs it)")


if __name__ == "__main__":
    main()
