"""GET /v1/ws end to end with a real client (the `websockets` package): credentials before the
upgrade, requests by id through the same routes as HTTP, streams and cancel, the limits that
close a socket (1009, 1008), server pings and dead peers, drain with 1001."""
import base64
import json
import os
import signal
import socket
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from helpers.keys import ALPHA, KEYS
from helpers.llm import metric

NO_CACHE = {"exact_enabled": False, "semantic_enabled": False}


def ws(d, token=ALPHA, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return connect(f"ws://127.0.0.1:{d.port}/v1/ws", additional_headers=headers, open_timeout=10, **kw)


def ask(sock, **msg):
    sock.send(json.dumps(msg))


def replies(sock, until, timeout=20.0):
    """Messages until `until(message)` is true (inclusive)."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        m = json.loads(sock.recv(timeout=max(0.1, deadline - time.monotonic())))
        out.append(m)
        if until(m):
            return out


@pytest.fixture
def llm(daemon_factory, demo_model):
    return daemon_factory(auth={"keys": KEYS}, cache=NO_CACHE, ratelimit={"key_rps": 1000.0},
                          inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 2048}]},
                          websocket={"ping_interval": 1.0, "ping_timeout": 2.0, "max_message_bytes": 65536,
                                     "max_outstanding": 4, "max_control_per_s": 10})


def test_credentials_before_the_upgrade_and_the_same_routes_after(llm):
    with pytest.raises(InvalidStatus) as e:
        ws(llm, token=None)
    assert e.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as e:
        ws(llm, token="sk-wrong-0123456789")
    assert e.value.response.status_code == 401
    with ws(llm) as s:
        ask(s, id=1, type="echo", body={"x": 1})
        assert json.loads(s.recv(timeout=10)) == {"id": 1, "status": 200, "body": {"object": "echo", "data": {"x": 1}}}
        # several in flight at once, answered by id: a stream and a whole answer
        ask(s, id="s", type="chat.completions", body={"model": "demo", "max_tokens": 6, "stream": True,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        ask(s, id="w", type="chat.completions", body={"model": "demo", "max_tokens": 6,
                                                      "messages": [{"role": "user", "content": "hello"}]})
        seen = []
        while not ({"s", "w"} <= {m["id"] for m in seen if m.get("done") or "body" in m}):
            seen.append(json.loads(s.recv(timeout=20)))
        stream = [m for m in seen if m["id"] == "s"]
        assert stream[-1] == {"id": "s", "done": True}
        chunks = [m["event"] for m in stream[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # (written before the sink)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        whole = next(m for m in seen if m["id"] == "w")
        assert whole["status"] == 200 and whole["body"]["object"] == "chat.completion"
        # the same validation as HTTP: a 400 naming the parameter, and the socket stays open
        ask(s, id=2, type="chat.completions", body={"model": "demo", "messages": [], "temperature": 9})
        err = json.loads(s.recv(timeout=10))
        assert err["id"] == 2 and err["status"] == 400 and err["error"]["param"]
        ask(s, id=3, type="nope")
        assert json.loads(s.recv(timeout=10))["error"]["param"] == "type"
        s.send("not json")
        assert json.loads(s.recv(timeout=10))["error"]["code"] == "invalid_json"
        # events and session updates go through their routes too
        ask(s, id=4, type="events", body={"key": "u1", "type": "click"})
        assert json.loads(s.recv(timeout=10))["status"] == 202
    assert metric(llm, "tidegate_ws_opened_total") >= 1


def test_a_session_token_opens_a_socket_and_patches_its_session(llm):
    from helpers.http import request
    r = request(llm.port, "POST", "/v1/sessions", json.dumps({"user": "u1", "attributes": {"n": 1}}).encode(),
                headers={"Authorization": f"Bearer {ALPHA}"})
    token = r.json()["token"]
    with ws(llm, token=token) as s:
        ask(s, id="p", type="session.patch", body={"attributes": {"n": 2}})
        assert json.loads(s.recv(timeout=10))["body"]["attributes"] == {"n": 2}
        ask(s, id="g", type="session.get")
        assert json.loads(s.recv(timeout=10))["body"]["attributes"] == {"n": 2}


def test_cancel_stops_the_generation(llm):
    before = metric(llm, "tidegate_llm_cancelled_total")
    with ws(llm) as s:
        ask(s, id="long", type="chat.completions", body={"model": "demo", "max_tokens": 1500, "stream": True,
                                                         "messages": [{"role": "user", "content": "go on"}]})
        first = json.loads(s.recv(timeout=20))
        assert first["id"] == "long" and "event" in first
        ask(s, id="c", type="cancel", target="long")
        msgs = replies(s, lambda m: m["id"] == "c")
        assert msgs[-1] == {"id": "c", "status": 200, "body": {"cancelled": "long"}}
        ask(s, id="e", type="echo", body={})  # nothing more of the cancelled stream after the answer
        after = replies(s, lambda m: m["id"] == "e")
        assert all(m["id"] == "e" for m in after)
    deadline = time.monotonic() + 10
    while metric(llm, "tidegate_llm_cancelled_total") <= before:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.2)


def test_limits_close_with_1009_and_1008(llm):
    with ws(llm) as s:
        s.send(json.dumps({"id": 1, "type": "echo", "body": {"x": "y" * 70000}}))
        with pytest.raises(ConnectionClosed) as e:
            s.recv(timeout=10)
        assert e.value.rcvd.code == 1009
    with ws(llm) as s:  # more in flight than max_outstanding
        for i in range(6):
            ask(s, id=i, type="chat.completions", body={"model": "demo", "max_tokens": 300, "stream": True,
                                                        "messages": [{"role": "user", "content": f"q{i}"}]})
        with pytest.raises(ConnectionClosed) as e:
            while True:
                s.recv(timeout=20)
        assert e.value.rcvd.code == 1008 and "in flight" in e.value.rcvd.reason
    with ws(llm) as s:  # a ping flood
        with pytest.raises(ConnectionClosed) as e:
            for _ in range(50):
                s.ping()
            while True:
                s.recv(timeout=10)
        assert e.value.rcvd.code == 1008


def _close_code(sock: socket.socket) -> int:
    """Read to EOF; the code of the server's close frame (unmasked, short)."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    at = data.index(b"\x88")  # (the close frame: opcode 8, FIN)
    return int.from_bytes(data[at + 2:at + 4], "big")


def _client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> bytes:
    key = os.urandom(4) if mask else b""
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if mask else payload
    n = len(payload)
    size = bytes([(0x80 if mask else 0) | n]) if n < 126 else bytes([(0x80 if mask else 0) | 126]) + n.to_bytes(2, "big")
    return bytes([(0x80 if fin else 0) | opcode]) + size + key + body


def test_fragments_and_protocol_errors(llm):
    """A message in fragments (with a ping between them) is one request; more fragments than
    max_fragments close with 1009; an unmasked frame with 1002; text that is not UTF-8 with 1007."""
    with ws(llm) as s:
        body = json.dumps({"id": "f", "type": "echo", "body": {"x": "y" * 3000}})
        s.send(iter([body[i:i + 100] for i in range(0, len(body), 100)]))  # 31 fragments
        assert json.loads(s.recv(timeout=10))["body"]["data"]["x"] == "y" * 3000
    with ws(llm) as s:
        with pytest.raises(ConnectionClosed) as e:
            s.send(iter(["{"] + ["  "] * 70 + ['"id": 1}']))
            s.recv(timeout=10)
        assert e.value.rcvd.code == 1009 and "fragments" in e.value.rcvd.reason
    raw = _raw_upgrade(llm.port)
    raw.sendall(_client_frame(1, b'{"id": 1, ', fin=False) + _client_frame(9, b"p")
                + _client_frame(0, b'"type": "echo", "body": {}}'))
    got = raw.recv(4096)
    while b'"id":1' not in got:  # (the pong comes first, then the reply)
        got += raw.recv(4096)
    assert got.startswith(b"\x8a\x01p")
    raw.sendall(_client_frame(1, b'{"id": 2}', mask=False))
    assert _close_code(raw) == 1002
    raw = _raw_upgrade(llm.port)
    raw.sendall(_client_frame(1, b'{"id": "\xff"}'))
    assert _close_code(raw) == 1007


def _server_frames(sock: socket.socket):
    """(opcode, payload) of each frame the server sends (unmasked), until EOF."""
    buf = b""
    while True:
        while len(buf) >= 2:
            n, at = buf[1] & 0x7F, 2
            if n == 126:
                n, at = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                n, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + n:
                break
            yield buf[0] & 0x0F, buf[at:at + n]
            buf = buf[at + n:]
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_a_slow_readers_stream_pauses_its_generation(daemon_factory, demo_model, transport):
    """A client that stops reading mid-stream: the stream runs a window ahead, then its sequence
    pauses (keeping its slot) rather than filling the send buffer; it is not closed, and once the
    client reads again the generation resumes and ends whole. Without the pause these 1,500
    tokens (~300 KB of messages) would pass send_buffer_bytes and close the socket with 1008
    (or, over HTTP, sit in the connection's buffer)."""
    d = daemon_factory(auth={"keys": KEYS}, cache=NO_CACHE,
                       inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 2048}]},
                       websocket={"send_buffer_bytes": 65536},
                       limits={"stream_send_buffer": 16384, "write_buffer_bytes": 32768})
    chat = {"model": "demo", "max_tokens": 1500, "stream": True, "temperature": 0,  # (greedy: no early EOS by chance)
            "messages": [{"role": "user", "content": "go on"}]}
    if transport == "websocket":
        sock = _raw_upgrade(d.port, rcvbuf=4096)
        sock.sendall(_client_frame(1, json.dumps({"id": "s", "type": "chat.completions", "body": chat}).encode()))
    else:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", d.port))
        body = json.dumps(chat).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + ALPHA.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.monotonic() + 60
    while metric(d, "tidegate_llm_paused_sequences") < 1:
        if time.monotonic() > deadline:
            sock.settimeout(1)
            raise AssertionError(f"the sequence never paused; the socket had {sock.recv(300)!r}")
        time.sleep(0.3)
    time.sleep(2)
    assert metric(d, "tidegate_llm_paused_sequences") == 1  # still paused: the client still does not read
    assert metric(d, "tidegate_llm_completion_tokens_total") == 0  # (nothing finished)
    sock.settimeout(30)
    chunks = []
    if transport == "websocket":
        for op, payload in _server_frames(sock):
            if op == 9:  # the server's ping (every ping_interval): a client answers it, as any does
                sock.sendall(_client_frame(10, payload))
                continue
            assert op == 1, (op, payload[:80])  # never a close frame (1008)
            msg = json.loads(payload)
            if msg.get("done"):
                break
            chunks.append(msg["event"])
    else:
        data = b""
        while b"data: [DONE]" not in data:
            more = sock.recv(65536)
            assert more, "the server closed the stream"
            data += more
        chunks = [json.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: {")]
    assert all("error" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and len(chunks) > 1000
    deadline = time.monotonic() + 10
    while metric(d, "tidegate_llm_paused_sequences") or metric(d, "tidegate_llm_stream_pauses_total") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    sock.close()


def test_a_reader_that_reads_nothing_for_idle_timeout_is_cut_off(daemon_factory, demo_model):
    """A paused stream whose reader reads nothing for inference.idle_timeout: its generation is
    cancelled (the slot is freed), and the stream ends with a reader_stalled error after what
    was already sent."""
    d = daemon_factory(auth={"keys": KEYS}, cache=NO_CACHE,
                       inference={"enabled": True, "idle_timeout": 2.0,
                                  "models": [{"name": "demo", "path": demo_model, "n_ctx": 2048}]},
                       websocket={"send_buffer_bytes": 65536, "ping_interval": 0.0},
                       limits={"stream_send_buffer": 16384})
    sock = _raw_upgrade(d.port, rcvbuf=4096)
    sock.sendall(_client_frame(1, json.dumps({"id": "s", "type": "chat.completions", "body": {
        "model": "demo", "max_tokens": 1500, "stream": True, "temperature": 0,
        "messages": [{"role": "user", "content": "go on"}]}}).encode()))
    deadline = time.monotonic() + 30
    while metric(d, "tidegate_llm_cancelled_total") < 1:  # paused, then cut off 2 s later
        assert time.monotonic() < deadline, "the stalled stream was never cancelled"
        time.sleep(0.3)
    assert metric(d, "tidegate_llm_paused_sequences") == 0 and metric(d, "tidegate_llm_stream_pauses_total") >= 1
    sock.settimeout(10)
    msgs = []
    for op, payload in _server_frames(sock):
        assert op == 1
        msgs.append(json.loads(payload))
        if msgs[-1].get("done"):
            break
    assert msgs[-2]["event"]["error"]["code"] == "reader_stalled" and msgs[-1] == {"id": "s", "done": True}
    assert not any(m.get("event", {}).get("choices", [{}])[0].get("finish_reason") for m in msgs[:-2])
    sock.close()


def _raw_upgrade(port: int, rcvbuf: int = 0) -> socket.socket:
    """A peer that upgrades and then never answers anything (a dead client)."""
    sock = socket.socket()
    if rcvbuf:  # (a small receive window: the server's buffers fill sooner)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /v1/ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {ALPHA}\r\n\r\n")
                 .encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    return sock


def test_server_pings_keep_live_peers_and_close_dead_ones(llm):
    with ws(llm) as live:  # the client answers pings by itself
        dead = _raw_upgrade(llm.port)
        dead.settimeout(10)
        data = b""
        t0 = time.monotonic()
        while True:  # a ping comes, goes unanswered, then the close frame and EOF
            chunk = dead.recv(4096)
            if not chunk:
                break
            data += chunk
        assert time.monotonic() - t0 < 15 and data[:1] == b"\x89"  # a ping (opcode 9) came first, then the close
        ask(live, id=1, type="echo", body={})
        assert json.loads(live.recv(timeout=5))["id"] == 1  # the live one is still open
    assert metric(llm, "tidegate_ws_closed_dead_total") >= 1


def test_drain_closes_sockets_with_1001_after_their_replies(llm):
    idle = ws(llm)
    busy = ws(llm)
    ask(busy, id="b", type="chat.completions", body={"model": "demo", "max_tokens": 200, "stream": True,
                                                     "messages": [{"role": "user", "content": "tell"}]})
    assert "event" in json.loads(busy.recv(timeout=20))
    llm.signal(signal.SIGTERM)
    with pytest.raises(ConnectionClosed) as e:
        idle.recv(timeout=10)
    assert e.value.rcvd.code == 1001
    msgs = []
    with pytest.raises(ConnectionClosed) as e:
        while True:
            msgs.append(json.loads(busy.recv(timeout=20)))
    assert e.value.rcvd.code == 1001
    assert msgs and msgs[-1] == {"id": "b", "done": True}  # its stream finished first
    assert llm.wait_exit(20) == 0


def test_permessage_deflate_when_configured(daemon_factory):
    d = daemon_factory(auth={"keys": KEYS}, websocket={"permessage_deflate": True})
    with ws(d) as s:  # the client offers permessage-deflate
        assert "permessage-deflate" in (s.response.headers.get("Sec-WebSocket-Extensions") or "")
        ask(s, id=1, type="echo", body={"text": "z" * 5000})
        assert json.loads(s.recv(timeout=10))["body"]["data"]["text"] == "z" * 5000
    off = daemon_factory(auth={"keys": KEYS})
    with ws(off) as s:
        assert not s.response.headers.get("Sec-WebSocket-Extensions")


def test_a_reload_closes_sockets_with_1001_and_the_next_generation_takes_new_ones(llm):
    old = ws(llm)
    ask(old, id=1, type="echo", body={})
    assert json.loads(old.recv(timeout=10))["id"] == 1
    llm.signal(signal.SIGHUP)
    with pytest.raises(ConnectionClosed) as e:
        old.recv(timeout=20)
    assert e.value.rcvd.code == 1001
    llm.wait_event("reloaded", timeout=30)
    with ws(llm) as new:
        ask(new, id=2, type="echo", body={})
        assert json.loads(new.recv(timeout=10))["id"] == 2


def test_at_the_open_files_limit_new_connections_wait_in_the_backlog(daemon_factory):
    """A worker whose open-files limit is 400 caps its connections below it (less what it holds
    for itself and server.fd_reserve) and stops accepting there: WebSockets past the cap wait in
    the listen backlog, none is accepted and dropped (what libuv does at EMFILE), and once some
    close the worker accepts again and every waiting one is upgraded."""
    import resource
    import selectors
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))  # (this process opens 450)
    d = daemon_factory(nofile=400, auth={"keys": KEYS}, server={"backlog": 1024},
                       websocket={"max_per_address": 1000})  # (one address opens them all)
    cap = next(e["cap"] for e in d.events() if e.get("event") == "connection cap set by the open-files limit")
    assert 200 < cap < 400 - 64
    sel, upgraded, dropped = selectors.DefaultSelector(), [], []
    key = base64.b64encode(os.urandom(16)).decode()
    head = (f"GET /v1/ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
            f"{key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {ALPHA}\r\n\r\n").encode()
    for _ in range(450):
        s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
        s.sendall(head)  # (past the cap: queued in the kernel until the worker accepts it)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)

    def collect(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end and len(sel.get_map()):
            for k, _ in sel.select(timeout=0.2):
                data = k.fileobj.recv(4096)
                sel.unregister(k.fileobj)
                (upgraded if data.startswith(b"HTTP/1.1 101") else dropped).append(k.fileobj)
    try:
        collect(5)
        assert not dropped and cap - 5 <= len(upgraded) <= cap
        assert any(e.get("event") == "connection cap reached; not accepting" for e in d.events())
        waiting = len(sel.get_map())
        assert waiting == 450 - len(upgraded)
        for s in upgraded[:150]:  # below 90% of the cap: accepting again
            s.close()
        collect(10)
        assert not dropped and not sel.get_map() and len(upgraded) == 450
    finally:
        for s in upgraded + dropped + [k.fileobj for k in sel.get_map().values()]:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
