"""API-key authentication and exact rate limits across workers, against the real daemon."""
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from helpers.http import request
from helpers.keys import ALPHA, BETA, GAMMA, KEYS
from tidegate.core.state.auth import hash_key
BODY = b'{"q": 1}'


def echo(port, key=None, header="authorization"):
    headers = {}
    if key:
        headers = {"Authorization": f"Bearer {key}"} if header == "authorization" else {"x-api-key": key}
    return request(port, "POST", "/v1/echo", BODY, headers=headers)


def test_api_routes_need_a_valid_key(daemon_factory):
    d = daemon_factory(workers=2, auth={"keys": KEYS})
    missing, wrong = echo(d.port), echo(d.port, "sk-test-nope-0123456789")
    assert missing.status == wrong.status == 401
    assert missing.body == wrong.body  # nothing says why
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert echo(d.port, ALPHA).status == 200
    assert echo(d.port, GAMMA, header="x-api-key").status == 200
    assert request(d.port, path="/healthz").status == 200  # probes stay open
    d.admin("stop")
    d.wait_exit()
    assert ALPHA not in d.logs() and hash_key(ALPHA) not in d.logs()


def test_hash_key_command():
    r = subprocess.run([sys.executable, "-m", "tidegate.workers.cli", "admin", "hash-key"], input=ALPHA + "\n",
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == hash_key(ALPHA)


def fire(port, key, n, threads=12):
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: echo(port, key), range(n)))


def test_key_limit_is_exact_across_workers(daemon_factory):
    d = daemon_factory(workers=2, auth={"keys": KEYS}, ratelimit={"key_rps": 2.0, "key_burst": 10.0})
    t0 = time.monotonic()
    replies = fire(d.port, ALPHA, 60)
    elapsed = time.monotonic() - t0
    ok = [r for r in replies if r.status == 200]
    limited = [r for r in replies if r.status == 429]
    assert len(ok) + len(limited) == 60
    assert 10 <= len(ok) <= 10 + 2 * elapsed + 1, (len(ok), elapsed)
    h = limited[0].headers
    assert h["ratelimit-limit"] == "10" and h["ratelimit-remaining"] == "0"
    assert int(h["retry-after"]) >= 1 and int(h["ratelimit-reset"]) >= 1
    assert limited[0].json()["error"]["type"] == "rate_limit_error"
    assert echo(d.port, GAMMA).status == 200  # other keys have their own buckets
    # both workers answered, so the limit really held across processes
    deadline = time.time() + 5
    while time.time() < deadline:
        rows = d.admin_json("workers")["body"]
        if sum(r["requests"] for r in rows) >= 61:
            break
        time.sleep(0.1)
    assert len(rows) == 2 and all(r["requests"] > 0 for r in rows), rows


def test_tenant_limit_is_shared_by_its_keys(daemon_factory):
    d = daemon_factory(workers=2, auth={"keys": KEYS}, ratelimit={"tenant_rps": 1.0, "tenant_burst": 8.0})
    t0 = time.monotonic()
    replies = fire(d.port, ALPHA, 20) + fire(d.port, BETA, 20)
    elapsed = time.monotonic() - t0
    ok = sum(r.status == 200 for r in replies)
    assert 8 <= ok <= 8 + elapsed + 1, (ok, elapsed)
    assert echo(d.port, GAMMA).status == 200  # another tenant


def test_state_plane_metrics(daemon_factory):
    d = daemon_factory(workers=2, auth={"keys": KEYS}, ratelimit={"key_rps": 1.0, "key_burst": 3.0})
    replies = fire(d.port, ALPHA, 10)
    limited = sum(r.status == 429 for r in replies)
    deadline = time.time() + 5
    while time.time() < deadline:
        text = request(d.port, path="/metrics").body.decode()
        if (f"tidegate_ratelimit_limited_total {float(limited)}" in text
                and f"tidegate_ratelimit_admitted_total {float(10 - limited)}" in text):
            break  # both workers' heartbeats have carried their counts
        time.sleep(0.2)
    assert f"tidegate_ratelimit_limited_total {float(limited)}" in text, text
    assert f"tidegate_ratelimit_admitted_total {float(10 - limited)}" in text
    assert "tidegate_ratelimit_buckets" in text and "tidegate_sessions_live 0.0" in text
