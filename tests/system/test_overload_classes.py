"""Traffic classes on the real daemon: a request's class from its model, route, key or tenant;
what a shed request of a cached class gets (approximate semantic entry, static fallback); the
per-class queueing deadline; box-level overload actions (keep-alive off, shed, stop accepting)."""
import json
import socket
import threading
import time

from helpers.http import raw_exchange, request
from helpers.llm import metric
from tidegate.core.state.auth import hash_key

BG, STD, VIP = "sk-cls-background-0123456789", "sk-cls-standard-0123456789", "sk-cls-vip-0123456789"
KEYS = [{"key_sha256": hash_key(BG), "tenant": "acme", "name": "bg", "class": "background"},
        {"key_sha256": hash_key(STD), "tenant": "acme", "name": "std", "class": "standard"},
        {"key_sha256": hash_key(VIP), "tenant": "vip", "name": "vip"}]  # no class: its tenant's
BUSY = "We are busy right now; please try again in a minute."


def ask(d, key, text, model="demo", path="/v1/chat/completions", max_tokens=6, timeout=30.0):
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return request(d.port, "POST", path, json.dumps(body).encode(),
                   headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}, timeout=timeout)


def test_classes_deadlines_and_what_shed_requests_get(daemon_factory, demo_model):
    d = daemon_factory(
        auth={"keys": KEYS}, classes={"tenants": {"vip": "critical"}, "routes": {"/v1/completions": "background"}},
        cache={"semantic_timeout": 2.0, "exact_enabled": False},
        overload={"approximate": 0.3},
        inference={"enabled": True, "reserved": {}, "max_seqs": 1,
                   "queue_deadline": {"critical": 10.0, "standard": 0.3, "background": 0.3},
                   "models": [{"name": "demo", "path": demo_model, "n_ctx": 4096, "fallback_text": BUSY},
                              {"name": "demo-critical", "path": demo_model, "n_ctx": 512, "class": "critical"}]})
    # the queueing deadline: with the only slot busy, a standard request is dropped unserved after
    # 0.3 s (504), a background one (policy cached) gets the model's static fallback instead
    long = threading.Thread(target=ask, args=(d, STD, "Tell me everything", "demo", "/v1/chat/completions", 4000))
    long.start()
    time.sleep(0.3)
    r = ask(d, STD, "Am I next?")
    assert r.status == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.body
    r = ask(d, BG, "Am I next too?")
    assert r.status == 200 and r.headers["x-tidegate-cache"] == "fallback", r.body
    assert r.json()["choices"][0]["message"]["content"] == BUSY
    long.join()

    # a semantic entry to approximate from
    first = ask(d, BG, "Book a flight from New York to Florida.")
    assert first.status == 200 and first.headers["x-tidegate-cache"] == "miss"
    deadline = time.time() + 5
    while time.time() < deadline and metric(d, "tidegate_semantic_inserts_total") < 1:
        time.sleep(0.1)
    for cls in ("background", "standard"):
        assert d.admin("shed", "on", cls).returncode == 0
    # shed, background: the reversed trip is no hit (the verifier refuses it) but the nearest
    # entry is an approximation, marked as one
    r = ask(d, BG, "Book a flight from Florida to New York.")
    assert r.status == 200 and r.headers["x-tidegate-cache"] == "approximate" and r.headers["x-tidegate-shed"] == \
        "background", r.headers
    assert r.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    # /v1/completions is background by route (and allows no approximations): the static fallback
    r = ask(d, STD, "Book a flight from New York to Florida.", path="/v1/completions")
    assert r.status == 200 and r.headers["x-tidegate-cache"] == "fallback" and r.json()["choices"][0]["text"] == BUSY
    assert ask(d, STD, "Anything").status == 503  # standard: reject
    r = request(d.port, "POST", "/v1/embeddings", json.dumps({"model": "demo", "input": "hi"}).encode(),
                headers={"Authorization": f"Bearer {BG}"})
    assert r.status == 503 and r.json()["error"]["code"] == "shed"  # embeddings: shed, nothing cached to give
    r = request(d.port, "POST", "/v1/chat/completions", json.dumps({
        "model": "demo", "messages": [{"role": "user", "content": "Anything"}], "max_tokens": 4, "n": 2}).encode(),
        headers={"Authorization": f"Bearer {BG}"})
    assert r.status == 503 and r.json()["error"]["code"] == "shed"  # no one cached answer stands for n choices
    r = ask(d, VIP, "Anything")  # tenant vip is critical: never shed
    assert r.status == 200 and "x-tidegate-shed" not in r.headers
    r = ask(d, BG, "Anything", model="demo-critical")  # the model's class wins over the key's
    assert r.status == 200 and "x-tidegate-shed" not in r.headers
    time.sleep(1.5)
    assert metric(d, "tidegate_shed_background_approximate_total") == 1
    assert metric(d, "tidegate_shed_background_fallback_total") == 2
    assert metric(d, "tidegate_semantic_approximate_total") == 1
    assert metric(d, "tidegate_shed_standard_rejected_total") == 1
    assert metric(d, "tidegate_shed_background_rejected_total") == 2


def test_box_level_overload_closes_keepalives_sheds_and_stops_accepting(daemon_factory, demo_model):
    inference = {"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 256}]}
    d = daemon_factory(auth={"keys": KEYS}, classes={"tenants": {"vip": "critical"}}, inference=inference,
                       cache={"semantic_enabled": False},
                       overload={"memory_limit": 1, "box_actions": {"keepalive": 0.5, "shed": 0.5}, "box_interval": 0.2})
    deadline = time.time() + 10
    while time.time() < deadline and d.admin_json("status")["body"]["box"]["actions"] != ["keepalive", "shed"]:
        time.sleep(0.1)
    assert d.admin_json("status")["body"]["box"]["memory_share"] > 1
    time.sleep(0.5)  # the ingress worker has been told
    reply, closed = raw_exchange(d.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.status == 200 and closed and reply.headers["connection"] == "close"
    r = ask(d, STD, "Anything")  # every class but critical is shed (standard: rejected)
    assert r.status == 503 and r.json()["error"]["code"] == "shed"
    assert ask(d, VIP, "Anything").status == 200

    e = daemon_factory(auth={"keys": KEYS}, inference=inference, cache={"semantic_enabled": False},
                       overload={"memory_limit": 1, "box_actions": {"accept": 0.5}, "box_interval": 0.2})
    deadline = time.time() + 10
    while time.time() < deadline and "accept" not in e.admin_json("status")["body"]["box"]["actions"]:
        time.sleep(0.1)
    time.sleep(0.5)
    with socket.create_connection(("127.0.0.1", e.port), timeout=1.5) as s:  # the kernel's backlog takes it...
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        try:
            got = s.recv(100)
        except socket.timeout:
            got = None
    assert got is None  # ...but no worker accepts it while the action is on
    assert "box-level overload" in e.logs()


def test_a_shed_reject_class_is_refused_before_its_large_body(daemon_factory, demo_model):
    d = daemon_factory(auth={"keys": KEYS}, cache={"semantic_enabled": False},
                       inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 256}]})
    for cls in ("standard", "background"):
        assert d.admin("shed", "on", cls).returncode == 0
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            "Authorization: Bearer {key}\r\nContent-Length: 500000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", d.port), timeout=3) as s:  # standard: reject
        s.sendall(head.format(key=STD).encode())  # and not one byte of the body
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        assert got.startswith(b"HTTP/1.1 503") and b"x-tidegate-shed: standard" in got and b"retry-after" in got
    with socket.create_connection(("127.0.0.1", d.port), timeout=0.7) as s:  # background: cached, so it
        s.sendall(head.format(key=BG).encode())  # needs the body (its cached answer is keyed by it)
        try:
            got = s.recv(4096)
        except socket.timeout:
            got = None
        assert got is None
    small = ask(d, STD, "a small body")  # under early_bytes: refused after reading, the same way
    assert small.status == 503 and small.json()["error"]["code"] == "shed"


def test_prediction_fallbacks_and_the_model_worker_drops_what_waited_too_long(daemon_factory, tmp_path):
    import os
    import signal
    import tomllib

    from tidegate.core.predict import demo
    path = demo.build(str(tmp_path / "demo"), users=50, merchants=10)
    with open(path, "rb") as f:
        sections = tomllib.load(f)
    for k in ("bind", "data_dir", "run_dir"):
        sections["server"].pop(k)
    rec = next(m for m in sections["predict"]["models"] if m["name"] == "recommend")
    rec["static"] = {"scores": [0.1] * 10}
    d = daemon_factory(auth={"keys": KEYS}, **{k: v for k, v in sections.items() if k != "server"})
    headers = {"Authorization": f"Bearer {BG}", "Content-Type": "application/json"}

    def recommend(user, timeout=10):
        return request(d.port, "POST", "/v1/predict/recommend", json.dumps({"entities": {"user": user}}).encode(),
                       headers=headers, timeout=timeout)
    assert recommend("u1").status == 200
    deadline = time.time() + 5  # that batch is counted (a heartbeat later) before the worker stops,
    while metric(d, "tidegate_model_batches_total") < 1:  # else `before` below would miss it
        assert time.time() < deadline
        time.sleep(0.1)
    pid = next(w["pid"] for w in d.admin_json("workers")["body"] if w["slot"] == "models")
    os.kill(pid, signal.SIGSTOP)  # scoring hangs past predict.worker_timeout (1 s)
    try:
        answers = []
        threads = [threading.Thread(target=lambda u=u: answers.append(recommend(u))) for u in ("u2", "u3", "u4")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # never served: the static answer, marked as such
        assert all(r.status == 200 and r.json()["fallback"] == "static" and r.json()["scores"] == [0.1] * 10
                   for r in answers), [r.body for r in answers]
        r = recommend("u1")
        assert r.status == 200 and r.json()["fallback"] == "last_served"
        before = metric(d, "tidegate_model_batches_total")
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.time() + 5  # the batches it finds on waking were sent > 1 s ago: dropped, not scored
    while time.time() < deadline and metric(d, "tidegate_model_expired_total") < 1:
        time.sleep(0.2)
    assert metric(d, "tidegate_model_expired_total") >= 1
    assert metric(d, "tidegate_model_batches_total") == before
    assert d.admin("shed", "on", "background").returncode == 0
    r = recommend("u9")  # shed, never served: the static answer again, marked shed
    assert r.status == 200 and r.headers["x-tidegate-shed"] == "background" and r.json()["fallback"] == "static"


def test_a_stuck_embedder_opens_its_breaker_and_lookups_are_skipped(daemon_factory, demo_model):
    import os
    import signal
    d = daemon_factory(auth={"keys": KEYS}, cache={"semantic_timeout": 0.2, "exact_enabled": False},
                       breakers={"min_calls": 3, "open_for": 0.5, "trial_calls": 1},
                       inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 256}]})
    assert ask(d, STD, "warm up").status == 200
    pid = next(w["pid"] for w in d.admin_json("workers")["body"] if w["slot"] == "embedder")
    os.kill(pid, signal.SIGSTOP)
    try:
        before = metric(d, "tidegate_semantic_timeouts_total"), metric(d, "tidegate_semantic_skipped_total")
        for i in range(8):  # answered by the model either way; the first ones wait out the lookup
            assert ask(d, STD, f"question {i}").status == 200
        # the first lookups time out (semantic_timeout); once the window holds enough failures
        # (min_calls 3, the warm-up's success among them) the breaker skips the lookup: each of
        # the 8 either waited its timeout or was skipped, and some were skipped (counted, not timed:
        # a wall-clock bound failed on a loaded box)
        timeouts = metric(d, "tidegate_semantic_timeouts_total") - before[0]
        skipped = metric(d, "tidegate_semantic_skipped_total") - before[1]
        assert timeouts >= 2 and skipped >= 1 and timeouts + skipped == 8, (timeouts, skipped)
        b = next(iter(d.admin_json("breakers")["body"].values()))["embedder"]
        assert b["opened"] >= 1
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # a trial lookup that comes back in time closes it
        ask(d, STD, "back?")
        time.sleep(0.6)
        b = next(iter(d.admin_json("breakers")["body"].values()))["embedder"]
        if b["state"] == "closed":
            break
    assert b["state"] == "closed"
