"""Fuzzing the real daemon: property-based hostile requests for every route (hypothesis) and
OpenAI's published API description (schemathesis, `not_a_server_error`). Nothing may answer a
5xx but a 503 with Retry-After, every error is OpenAI-shaped, no process restarts, and /healthz
is fine afterwards. A short budget here; bench/fuzz.py runs a long one."""
import os
import pathlib
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings

from helpers.daemon import Daemon
from helpers.fuzz import MODEL, case, exchange, problems
from helpers.http import request

EXAMPLES = int(os.environ.get("TIDEGATE_FUZZ_EXAMPLES", "150"))
SPEC = pathlib.Path(__file__).resolve().parents[3] / "shared" / "specs" / "openai-subset.json"


def demo_sections(root, data_dir) -> dict:
    """The feature and prediction sections of `tidegate demo features` (rows loaded into the
    daemon's data_dir, no Redis)."""
    import tomllib

    from tidegate.core.predict import demo
    from tidegate.workers import load_config
    path = demo.build(str(root), users=50, merchants=20)
    demo.load_rows(load_config(path, {"server.data_dir": str(data_dir)}), str(root))
    with open(path, "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def target(tmp_path_factory, demo_model):
    tmp = tmp_path_factory.mktemp("fuzz")
    demo_cfg = demo_sections(tmp / "demo", tmp / "data")
    d = Daemon(tmp, workers=2, events={"views": [{"name": "n", "kind": "count"}] + demo_cfg["events"]["views"]},
               features=demo_cfg["features"], predict=demo_cfg["predict"],
               inference={"enabled": True, "models": [{"name": MODEL, "path": demo_model, "n_ctx": 256,
                                                       "max_seqs": 4, "embeddings": True}]})
    d.start()
    pids = {r["id"]: r["pid"] for r in d.admin_json("workers")["body"]}
    yield d
    try:
        status = d.admin_json("status")["body"]
        assert status["respawns"] == 0, d.logs()[-3000:]
        assert {r["id"]: r["pid"] for r in d.admin_json("workers")["body"]} == pids  # no process restarted
        assert request(d.port, path="/healthz").status == 200
    finally:
        d.stop()


def test_hostile_requests_to_every_route(target):
    seen = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case())
    def one(c):
        data, _ = c
        replies = exchange(target.port, data)
        seen.append(len(replies))
        assert not problems(replies), (data[:300], problems(replies))

    one()
    assert len(seen) == EXAMPLES and sum(seen) >= EXAMPLES


@pytest.mark.skipif(not SPEC.exists(), reason="needs ../shared/specs/openai-subset.json beside the checkout")
def test_openai_spec_fuzzing_finds_no_server_error(target, tmp_path):
    r = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", str(SPEC), "--url", f"http://127.0.0.1:{target.port}/v1",
                        "--checks", "not_a_server_error", "--max-examples", os.environ.get("TIDEGATE_SPEC_EXAMPLES", "25"),
                        "--phases", "examples,fuzzing", "--seed", "1", "--request-timeout", "30",
                        "--report-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, NO_COLOR="1"))
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert re.search(r"\b[1-9]\d* generated", r.stdout), r.stdout[-3000:]  # it really sent cases
