"""tidegate loadtest against the real daemon: an open-loop scenario with a rate profile and
sessions, a report per class and stream (HDR percentiles, outcomes), the JSON and the PNG;
a bad scenario names its key."""
import json
import subprocess
import sys

from helpers.keys import ALPHA, KEYS


def loadtest(d, *args):
    return subprocess.run([sys.executable, "-m", "tidegate.workers.cli", "loadtest", *args], capture_output=True,
                          text=True, timeout=120, cwd=d.dir)


def test_open_loop_run_reports_per_class_and_stream(daemon_factory, tmp_path):
    d = daemon_factory(auth={"keys": KEYS})
    scen = tmp_path / "s.toml"
    scen.write_text(f'''url = "http://127.0.0.1:{d.port}"
duration = 4
profile = [[0, 1.0], [2, 2.0]]
phases = {{before = [0, 2], spike = [2, 4]}}
[[streams]]
name = "echo"
class = "critical"
rate = 50.0
follows_profile = false
method = "POST"
path = "/v1/echo"
headers = {{Authorization = "Bearer {ALPHA}", Content-Type = "application/json"}}
body = ['{{"n": ${{n}}}}']
vars = {{n = [0, 9]}}
[[streams]]
name = "sessions"
class = "background"
rate = 20.0
method = "GET"
path = "/v1/sessions/current"
headers = {{Authorization = "Bearer {ALPHA}"}}
sessions = 3
[[streams]]
name = "missing"
class = "standard"
rate = 10.0
follows_profile = false
path = "/v1/nope"
''')
    out = tmp_path / "out"
    r = loadtest(d, str(scen), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "t=   0s" in r.stderr  # the live line per second
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.png").stat().st_size > 10000
    echo = rep["streams"]["echo"]["total"]
    assert 190 <= echo["requests"] <= 201 and echo["ok"] == echo["requests"]  # 50/s for 4 s, open loop
    sess = rep["streams"]["sessions"]
    assert sess["class"] == "background" and sess["total"]["ok"] == sess["total"]["requests"]  # tokens worked
    assert 130 <= sess["total"]["requests"] <= 141  # 20/s rising to 40/s over 2 s, then 40/s
    assert rep["streams"]["missing"]["total"]["error"] == rep["streams"]["missing"]["total"]["requests"] > 30  # 404s
    crit = rep["classes"]["critical"]
    assert crit["phases"]["before"]["p99_ms"] > 0 and crit["spike_p99_ratio"] is not None
    bad = tmp_path / "bad.toml"
    bad.write_text('duration = 2\n[[streams]]\nclass = "urgent"\n')
    r = loadtest(d, str(bad))
    assert r.returncode == 2 and "streams[0].class" in r.stderr
