"""Hostile clients against one real daemon: each test is an attack from issue 26's review, an
attacker and a victim on the same daemon, and what must hold (the attacker gets a clear error,
no process restarts, the victim is served)."""
import pytest

from helpers.llm import demo_llm, post
from helpers.wait import wait_for

MSG = [{"role": "user", "content": "Tell me a story about the sea"}]


@pytest.fixture
def llm(daemon_factory, demo_model):
    return demo_llm(daemon_factory, demo_model, exact=False)


def api(port, method, path, token=None, body=None):
    import json
    from helpers.http import request
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return request(port, method, path, None if body is None else json.dumps(body).encode(), headers=headers,
                   timeout=30.0)


def respawns(d) -> int:
    return d.admin_json("status")["body"]["respawns"]


def served(d) -> None:
    """A victim's plain request is answered."""
    r = post(d, "/v1/chat/completions", {"model": "demo", "messages": MSG, "max_tokens": 4})
    assert r.status == 200, r.body


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize("route, body, param", [
    ("/v1/chat/completions", {"response_format": schema_format({"type": "string", "maxLength": 20000})},
     "response_format.json_schema.schema.maxLength"),
    ("/v1/chat/completions", {"response_format": schema_format({"type": "array", "minItems": 5000})},
     "response_format.json_schema.schema.minItems"),
    ("/v1/chat/completions", {"response_format": schema_format({"type": "string", "pattern": "^a{1,20000}$"})},
     "response_format.json_schema.schema.pattern"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"s": {"type": "string", "maxLength": 20000}}}}}],
        "tool_choice": "required"}, "tools[0].function.parameters.properties.s.maxLength"),
    ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "x",
                                           "schema": {"type": "string", "maxLength": 20000}}}},
     "text.format.schema.maxLength"),
])
def test_a_grammar_past_what_llama_cpp_parses_is_a_400_and_crashes_nothing(llm, route, body, param):
    """maxLength 20000 unrolls into a 20,000-deep grammar, which overflowed the inference
    worker's stack (SIGSEGV: every tenant's streams cut)."""
    base = {"model": "demo", **({"input": "hi", "max_output_tokens": 4} if route == "/v1/responses"
                                else {"messages": MSG, "max_tokens": 4})}
    r = post(llm, route, dict(base, **body))
    assert r.status == 400, r.body
    err = r.json()["error"]
    assert err["param"] == param, err
    assert respawns(llm) == 0
    served(llm)


def test_the_grammar_depth_is_checked_whatever_builds_it(daemon_factory, demo_model):
    """The backstop behind the schema checks: the finished grammar's nesting (here a pattern of
    300 nested groups, within max_pattern_bytes, against max_grammar_depth 256)."""
    d = daemon_factory(cache={"exact_enabled": False, "semantic_enabled": False},
                       inference={"enabled": True, "max_grammar_depth": 256,
                                  "models": [{"name": "demo", "path": demo_model, "n_ctx": 1024}]})
    deep = "^" + "(" * 300 + "a" + ")" * 300 + "$"
    r = post(d, "/v1/chat/completions", {"model": "demo", "messages": MSG, "max_tokens": 4,
                                         "response_format": schema_format({"type": "string", "pattern": deep})})
    assert r.status == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema", r.body
    assert "max_grammar_depth" in r.json()["error"]["message"]
    served(d)
    assert respawns(d) == 0


ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>")


def test_a_template_that_refuses_one_tenants_messages_is_a_400_and_opens_no_breaker(daemon_factory, demo_model):
    """Templates (Llama-2, Mistral, Gemma) raise on roles that do not alternate: that was a 500,
    and ten of them opened the model's circuit breaker for every tenant."""
    from helpers.keys import ALPHA, GAMMA, KEYS
    from helpers.http import request
    import json
    d = daemon_factory(auth={"keys": KEYS}, cache={"exact_enabled": False, "semantic_enabled": False},
                       breakers={"min_calls": 4, "open_for": 30.0},
                       inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 1024,
                                                               "chat_template": ALTERNATING}]})

    def ask(key, messages):
        return request(d.port, "POST", "/v1/chat/completions",
                       json.dumps({"model": "demo", "messages": messages, "max_tokens": 4}).encode(),
                       headers={"Authorization": f"Bearer {key}"}, timeout=30.0)
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for _ in range(12):
        r = ask(ALPHA, twice)
        assert r.status == 400, r.body
        err = r.json()["error"]
        assert err["param"] == "messages" and "alternate" in err["message"], err
    r = ask(GAMMA, MSG)  # another tenant
    assert r.status == 200, r.body
    r = ask(ALPHA, MSG)  # and the attacker's own well-formed request
    assert r.status == 200, r.body
    assert respawns(d) == 0


def test_a_session_cannot_open_sessions_for_other_users(daemon_factory):
    """A session token opened sessions for any `user`: minting users voided per-user limits and
    let one user act as another. Only an API key opens a session; a session's user is fixed."""
    from helpers.keys import ALPHA, KEYS
    d = daemon_factory(auth={"keys": KEYS})
    token = api(d.port, "POST", "/v1/sessions", ALPHA, {"user": "alice"}).json()["token"]
    r = api(d.port, "POST", "/v1/sessions", token, {"user": "mallory"})
    assert r.status == 403 and r.json()["error"]["code"] == "api_key_required", r.body
    assert api(d.port, "GET", "/v1/sessions/current", token).json()["user"] == "alice"
    assert api(d.port, "POST", "/v1/sessions", ALPHA, {"user": "bob"}).status == 201  # the key still can


def test_a_model_or_view_on_a_daemon_without_any_is_named_in_its_404(daemon_factory):
    d = daemon_factory()
    for method, path, param in (("POST", "/v1/predict/fraud", "model"), ("GET", "/v1/predict/fraud", "model"),
                                ("POST", "/v1/predict/fraud/batch", "model"), ("GET", "/v1/features/users/42", "view"),
                                ("GET", "/v1/views/clicks/42", "view")):
        r = api(d.port, method, path, body={} if method == "POST" else None)
        err = r.json()["error"]
        assert r.status == 404 and err["param"] == param and "declared: none" in err["message"], (path, err)


def test_a_metrics_flood_costs_one_render_and_readiness_answers_meanwhile(daemon_factory):
    """1,000 keep-alive connections asking /metrics saturated the supervisor (a render per
    request, kept up for askers that had left) and /readyz, queued behind, answered 503."""
    import threading
    from helpers.http import request
    d = daemon_factory(workers=2, server={"metrics_interval": 60.0})
    before = d.admin_json("status")["body"]["metrics_renders"]
    stop, answered, ready = threading.Event(), [], []

    def flood():
        while not stop.is_set():
            answered.append(request(d.port, path="/metrics", timeout=30.0).status)
    threads = [threading.Thread(target=flood) for _ in range(32)]
    for t in threads:
        t.start()
    while len(answered) < 400:
        ready.append(request(d.port, path="/readyz", timeout=30.0).status)
    stop.set()
    for t in threads:
        t.join()
    assert set(answered) == {200} and set(ready) == {200}, (set(answered), set(ready))
    # rendered at most once per interval, whichever worker asked: a flood of 400 costs one
    assert d.admin_json("status")["body"]["metrics_renders"] - before <= 1


def test_a_metrics_flood_from_one_address_is_refused_cheaply(daemon_factory):
    """Past server.metrics_rps_per_address (burst 2x) an address gets a small 429 with
    Retry-After instead of the whole text; readiness is not limited (load balancers ask it)."""
    d = daemon_factory(server={"metrics_rps_per_address": 0.5})  # burst: one scrape, then one per 2 s
    got = [api(d.port, "GET", "/metrics") for _ in range(6)]
    assert got[0].status == 200 and got[0].body.startswith(b"# HELP")
    refused = [r for r in got if r.status == 429]  # (each refusal is held back up to 1 s: 6 scrapes take
    assert len(refused) >= 2, [r.status for r in got]  # over 5 s, in which at most 3 more fit)
    assert refused[0].json()["error"]["code"] == "rate_limit_exceeded" and "retry-after" in refused[0].headers
    assert len(refused[0].body) < 512
    assert all(api(d.port, "GET", "/readyz").status == 200 for _ in range(10))


def test_metrics_can_require_a_key(daemon_factory):
    from helpers.keys import ALPHA, KEYS
    d = daemon_factory(auth={"keys": KEYS}, server={"metrics_auth": True})
    assert api(d.port, "GET", "/metrics").status == 401
    assert api(d.port, "GET", "/metrics", ALPHA).status == 200
    assert api(d.port, "GET", "/readyz").status == 200  # (readiness stays open: load balancers ask it)


def test_a_full_views_store_stops_the_builder_and_reports_it_never_a_crash_loop(daemon_factory):
    """A last_n view of large payloads filled the views LMDB: the builder crash-looped on
    MDB_MAP_FULL for every tenant, and each respawn hid the lag from /readyz."""
    import json
    from helpers.http import request
    from helpers.llm import metric
    d = daemon_factory(events={"views": [{"name": "recent", "kind": "last_n", "n": 50}],
                               "views_map_bytes": 1 << 20, "view_lag_max": 0.5})
    big = "x" * 30000
    for batch in range(8):  # ~1.2 MB of rows for a 1 MiB store
        evs = [{"key": f"k{batch}-{i}", "type": "t", "payload": {"blob": big}} for i in range(5)]
        assert request(d.port, "POST", "/v1/events", json.dumps(evs).encode(), timeout=10).status == 202
    d.wait_event("views store full", timeout=30)
    wait_for(lambda: request(d.port, path="/readyz").status == 503, 30,  # the lag shows: the views are stale
             "readiness never reported the stalled views")
    assert metric(d, "tidegate_views_full") == 1 and respawns(d) == 0
    assert "largest_view" in d.logs() and '"recent"' in d.logs()


def test_n_choices_count_as_n_requests_against_the_callers_limits(daemon_factory, demo_model):
    from helpers.keys import ALPHA, GAMMA, KEYS
    d = daemon_factory(auth={"keys": KEYS}, ratelimit={"key_rps": 0.001, "key_burst": 4.0},
                       cache={"exact_enabled": False, "semantic_enabled": False},
                       inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 1024}]})
    body = {"model": "demo", "messages": MSG, "max_tokens": 2}
    r = api(d.port, "POST", "/v1/chat/completions", ALPHA, dict(body, n=4))
    assert r.status == 200 and len(r.json()["choices"]) == 4, r.body
    assert api(d.port, "POST", "/v1/chat/completions", ALPHA, body).status == 429  # the 4 were spent
    r = api(d.port, "POST", "/v1/chat/completions", GAMMA, dict(body, n=5))  # the guard takes 1, 4 more do not fit
    assert r.status == 429 and "retry-after" in r.headers, r.body


def test_connections_dribbling_a_body_do_not_lock_out_new_clients(daemon_factory):
    """40 connections at max_connections = 40 each sending a request body a byte at a time:
    each read reset the body timer and body-phase connections were never evicted, so new
    clients were locked out. Now a new client evicts the slowest body-sender, and a body that
    does not average limits.min_body_rate is cut (408)."""
    import socket
    import threading
    from helpers.http import request
    d = daemon_factory(workers=1, server={"max_connections": 40}, limits={"header_timeout": 1.0})
    stop, socks, cut = threading.Event(), [], []
    head = b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", d.port))
        s.sendall(head + b"[")
        socks.append(s)

    def dribble():
        while not stop.is_set():
            for s in socks:
                try:
                    s.send(b"1")
                except OSError:
                    if s not in cut:
                        cut.append(s)
            stop.wait(0.2)
    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    try:
        for _ in range(5):  # new clients are served (a dribbler makes room), and promptly
            assert request(d.port, path="/healthz", timeout=20.0).status == 200
        # and every dribbler is cut: 5 bytes/s is under min_body_rate
        wait_for(lambda: len(cut) >= 40, 30, "not every dribbler was cut")
    finally:
        stop.set()
        t.join()
        for s in socks:
            s.close()
    assert respawns(d) == 0


def _ws_upgrade(port: int, key: str | None = None):
    """A raw upgraded socket (the client's frames are written by hand) and the server's answer head."""
    import base64
    import os
    import socket
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    s.sendall((f"GET /v1/ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
               f"{base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    return s, head


def test_a_websocket_that_pings_but_never_reads_is_timed_out(daemon_factory):
    """The server pinged only sockets quiet for ping_interval: a client sending its own pings
    and reading nothing was never pinged, never timed out, and held its slot for good. Now the
    peer's own pongs are its liveness: one that does not read does not answer, and is closed."""
    from helpers.llm import metric
    d = daemon_factory(websocket={"ping_interval": 0.5, "ping_timeout": 0.5})
    s, head = _ws_upgrade(d.port)
    assert head.startswith(b"HTTP/1.1 101"), head
    def pinged_out() -> bool:
        try:
            s.send(b"\x89\x80" + b"\x01\x02\x03\x04")  # a masked ping, well under max_control_per_s
        except OSError:
            pass  # closed by the server already (the metric follows with the next heartbeat)
        return metric(d, "tidegate_ws_closed_dead_total") >= 1
    try:
        wait_for(pinged_out, 30, "the non-reading socket was never closed", every=0.2)
    finally:
        s.close()


def test_websockets_are_capped_per_key_and_per_address(daemon_factory):
    from helpers.keys import ALPHA, BETA, KEYS
    d = daemon_factory(auth={"keys": KEYS}, websocket={"max_per_key": 2, "max_per_address": 3})
    held = [_ws_upgrade(d.port, ALPHA) for _ in range(2)]
    assert all(h.startswith(b"HTTP/1.1 101") for _, h in held)
    s, head = _ws_upgrade(d.port, ALPHA)  # the key's third
    assert head.startswith(b"HTTP/1.1 429"), head
    s.close()
    other, head = _ws_upgrade(d.port, BETA)  # another key, the address's third: fine
    assert head.startswith(b"HTTP/1.1 101"), head
    extra, head = _ws_upgrade(d.port, BETA)  # the address's fourth: upgraded, then closed 1008
    assert head.startswith(b"HTTP/1.1 101")
    frame = extra.recv(2)
    assert frame[0] == 0x88  # a close frame
    code = int.from_bytes(extra.recv(frame[1] & 0x7F)[:2], "big")
    assert code == 1008
    for sock in [x for x, _ in held] + [other, extra]:
        sock.close()


def test_streams_whose_reader_never_reads_do_not_keep_the_slots_from_others(daemon_factory, demo_model):
    """Class 3: streams nobody reads had kept every slot they paused in until idle_timeout (60 s)
    while other tenants' requests waited: now a paused stream gives its slot up when work waits
    (its KV to RAM), and the waiting request is served while the streams stay open."""
    import json
    import socket
    from helpers.keys import ALPHA, KEYS
    from helpers.llm import metric
    from tidegate.core.state.auth import hash_key
    other = "sk-test-other-tenant-0123456789"  # a second tenant, standard class like the reader's
    d = daemon_factory(auth={"keys": KEYS + [{"key_sha256": hash_key(other), "tenant": "initech"}]}, cache={"exact_enabled": False, "semantic_enabled": False},
                       limits={"stream_send_buffer": 16384, "write_buffer_bytes": 32768},
                       inference={"enabled": True, "max_slots_per_request": 1,
                                  "models": [{"name": "demo", "path": demo_model, "n_ctx": 2048, "max_seqs": 3}]})
    body = json.dumps({"model": "demo", "max_tokens": 1500, "stream": True, "temperature": 0,
                       "messages": [{"role": "user", "content": "go on"}]}).encode()
    socks = []
    for _ in range(2):  # both slots standard work may take (the third is reserved for critical)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", d.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + ALPHA.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        socks.append(s)
    wait_for(lambda: metric(d, "tidegate_llm_paused_sequences") >= 2, 120, "both streams to pause for their reader")
    r = api(d.port, "POST", "/v1/chat/completions", other, {"model": "demo", "messages": MSG, "max_tokens": 4})
    assert r.status == 200, r.body
    wait_for(lambda: metric(d, "tidegate_llm_paused_evictions_total") >= 1, 30, "the eviction to reach /metrics")
    assert metric(d, "tidegate_llm_paused_sequences") == 2  # the streams are still there, paused
    status = d.admin_json("status")["body"]
    assert status["limits"]["llm_paused_evictions"] >= 1 and status["limits"]["llm_stream_pauses"] >= 2  # it shows
    assert respawns(d) == 0
    for s in socks:
        s.close()
