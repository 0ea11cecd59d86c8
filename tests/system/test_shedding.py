"""Shedding on the real daemon: forced for a drill (`tidegate admin shed on CLASS`) and from the
inference worker's own queueing delay (backpressure). A cached class gets a stale exact-cache
answer or the last prediction, marked; a reject class gets 503 + Retry-After; critical is served."""
import json
import threading
import time

from helpers.http import request
from tidegate.core.state.auth import hash_key

BG, STD, CRIT = "sk-shed-background-0123456789", "sk-shed-standard-0123456789", "sk-shed-critical-0123456789"
KEYS = [{"key_sha256": hash_key(BG), "tenant": "acme", "name": "bg", "class": "background"},
        {"key_sha256": hash_key(STD), "tenant": "acme", "name": "std", "class": "standard"},
        {"key_sha256": hash_key(CRIT), "tenant": "acme", "name": "crit", "class": "critical"}]


def chat(d, key, text, max_tokens=4, timeout=30.0):
    body = {"model": "tidegate-demo", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0}
    return request(d.port, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                   headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}, timeout=timeout)


def test_forced_shedding_serves_stale_rejects_and_spares_critical(daemon_factory, demo_model):
    d = daemon_factory(auth={"keys": KEYS}, cache={"exact_ttl": 0.5, "semantic_enabled": False},
                       inference={"enabled": True, "models": [{"name": "tidegate-demo", "path": demo_model, "n_ctx": 256}]})
    assert chat(d, BG, "what is the capital of France?").status == 200
    time.sleep(0.7)  # the entry is past its ttl now: a plain request would miss it
    for cls in ("background", "standard", "critical"):
        assert d.admin("shed", "on", cls).returncode == 0
    assert d.admin_json("shed", "status")["body"]["forced"] == ["background", "critical", "standard"]
    r = chat(d, BG, "what is the capital of France?")
    assert r.status == 200 and r.headers["x-tidegate-cache"] == "stale" and r.headers["x-tidegate-shed"] == "background"
    r = chat(d, BG, "something nobody asked before")
    assert r.status == 503 and r.json()["error"]["code"] == "shed" and int(r.headers["retry-after"]) >= 1
    assert r.headers["x-tidegate-shed"] == "background"
    assert chat(d, STD, "what is the capital of France?").status == 503  # reject: no cached answers
    r = chat(d, CRIT, "something nobody asked before")
    assert r.status == 200 and "x-tidegate-shed" not in r.headers  # critical's policy is never
    for cls in ("background", "standard", "critical"):
        d.admin("shed", "off", cls)
    assert chat(d, BG, "something else nobody asked").status == 200
    time.sleep(1.5)
    text = request(d.port, path="/metrics").body.decode()
    assert "tidegate_shed_background_stale_total 1.0" in text and "tidegate_shed_background_rejected_total 1.0" in text
    assert "tidegate_shed_standard_rejected_total 1.0" in text


def test_queueing_delay_at_the_model_sheds_background_at_the_door(daemon_factory, demo_model):
    d = daemon_factory(auth={"keys": KEYS}, cache={"exact_enabled": False, "semantic_enabled": False},
                       inference={"enabled": True, "models": [{"name": "tidegate-demo", "path": demo_model, "n_ctx": 512,
                                              "max_seqs": 2}], "reserved": {"critical": 1},
                                  "queue_max": {"critical": 256, "standard": 256, "background": 1000}})
    results, stop = [], time.monotonic() + 6
    lock = threading.Lock()

    def flood(i):
        while time.monotonic() < stop:
            r = chat(d, BG, f"tell me a long story number {i} {time.monotonic()}", max_tokens=200, timeout=60)
            with lock:
                results.append((r.status, r.headers.get("x-tidegate-shed"), r.json().get("error", {}).get("code")
                                if r.status != 200 else None))
    threads = [threading.Thread(target=flood, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    time.sleep(2.5)  # the background queue's delay has stayed over 5 ms for 100 ms by now
    crit = [chat(d, CRIT, f"fraud check {i}", max_tokens=4) for i in range(5)]
    for t in threads:
        t.join()
    assert all(r.status == 200 for r in crit)  # critical is never shed, its reserved slot holds
    shed = [r for r in results if r[0] == 503 and r[1] == "background" and r[2] == "shed"]
    assert shed, results[:20]  # background was shed at the door, before reaching the model's queue
    # answered either way: none hung or failed otherwise (on a loaded box a queued one may pass its
    # class's queueing deadline: a 504 deadline_exceeded is an answer for load too)
    odd = [r for r in results if r[0] not in (200, 503) and r[2] != "deadline_exceeded"]
    assert not odd, odd


def test_a_failing_model_opens_its_breaker_then_trials_close_it(daemon_factory, demo_model):
    import os
    import signal
    d = daemon_factory(auth={"keys": KEYS}, cache={"exact_enabled": False, "semantic_enabled": False},
                       breakers={"min_calls": 3, "open_for": 1.0, "trial_calls": 1},
                       server={"respawn_backoff_max": 3.0},
                       inference={"enabled": True, "models": [{"name": "tidegate-demo", "path": demo_model,
                                                               "n_ctx": 256}]})
    assert chat(d, STD, "warm up").status == 200
    pid = next(w["pid"] for w in d.admin_json("workers")["body"] if w["slot"] == "model:tidegate-demo")
    os.kill(pid, signal.SIGKILL)
    codes = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "circuit_open" not in codes:
        r = chat(d, STD, "while it is gone")
        codes.append(r.json().get("error", {}).get("code") if r.status != 200 else "ok")
        time.sleep(0.02)
    assert "circuit_open" in codes, codes  # worker_unavailable answers opened it; now it answers at once
    r = chat(d, STD, "still open")
    assert r.status in (200, 503)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the worker comes back; after open_for one trial call closes it
        if chat(d, STD, "back?").status == 200:
            break
        time.sleep(0.3)
    assert chat(d, STD, "back for good").status == 200
    time.sleep(1.5)
    b = next(iter(d.admin_json("breakers")["body"].values()))["inference:tidegate-demo"]
    assert b["state"] == "closed" and b["opened"] >= 1
    text = request(d.port, path="/metrics").body.decode()
    assert 'tidegate_breaker_state{downstream="inference:tidegate-demo",state="closed"} 1.0' in text
    opened = [ln for ln in text.splitlines() if ln.startswith('tidegate_breaker_transitions_to_open_total{downstream="inference')]
    assert opened and float(opened[0].split()[-1]) >= 1
