"""The feature registry end to end: `tidegate features load` switches a version while the daemon
serves, GET /v1/features returns the caller's tenant's row, bad files are refused whole."""
import json
import subprocess
import sys

from helpers.http import request
from helpers.keys import ALPHA, GAMMA, KEYS

VIEWS = [{"name": "user", "entity": "user_id", "features": [
    {"name": "age", "dtype": "int64", "default": 0}, {"name": "spend_30d", "dtype": "float32", "default": 0.0}]}]


def features(d, *args):
    return subprocess.run([sys.executable, "-m", "tidegate.workers.cli", "features", "--config", str(d.config_path),
                           *args], capture_output=True, text=True, timeout=60, cwd=d.dir)


def test_load_get_and_tenants(daemon_factory, tmp_path):
    d = daemon_factory(workers=2, auth={"keys": KEYS}, features={"views": VIEWS})
    acme, globex = {"Authorization": f"Bearer {ALPHA}"}, {"Authorization": f"Bearer {GAMMA}"}
    assert request(d.port, path="/v1/features/user/u1", headers=acme).status == 404
    csv = tmp_path / "users.csv"
    csv.write_text("user_id,age,spend_30d\nu1,41,12.5\nu2,7,\n")
    r = features(d, "load", "user", str(csv), "--tenant", "acme")
    assert r.returncode == 0, r.stderr
    got = request(d.port, path="/v1/features/user/u1", headers=acme)
    assert got.status == 200 and got.json()["features"] == {"age": 41, "spend_30d": 12.5} and got.json()["version"] == 1
    assert request(d.port, path="/v1/features/user/u2", headers=acme).json()["features"]["spend_30d"] == 0.0
    assert request(d.port, path="/v1/features/user/u1", headers=globex).status == 404  # another tenant's row
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"user_id": "u1", "age": 50}) + "\n" + json.dumps({"user_id": "u3", "age": "x"}) + "\n")
    r = features(d, "load", "user", str(bad), "--tenant", "acme")
    assert r.returncode == 1 and "row 2, column 'age'" in r.stderr
    assert request(d.port, path="/v1/features/user/u1", headers=acme).json()["features"]["age"] == 41  # untouched
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"user_id": "u1", "age": 42}) + "\n")
    assert features(d, "load", "user", str(good), "--tenant", "acme").returncode == 0
    got = request(d.port, path="/v1/features/user/u1", headers=acme).json()
    assert got["features"]["age"] == 42 and got["version"] == 2
    stats = json.loads(features(d, "--json", "stats").stdout)
    assert stats == [{"view": "user", "entity": "user_id", "features": 2, "version": 2, "rows": 1}]
    assert request(d.port, path="/v1/features/nope/u1", headers=acme).json()["error"]["param"] == "view"
