"""HTTP/1.1 behaviour of a real ingress worker: keep-alive, pipelining, limits, smuggling, errors."""
import json
import socket
import time

import pytest

from helpers.daemon import Daemon
from helpers.http import Reader, connect, raw_exchange, request

LIMITS = {"max_request_line": 256, "max_header_bytes": 1024, "max_headers": 10, "max_body_bytes": 4096,
          "max_json_depth": 8, "max_json_number_chars": 12, "header_timeout": 1.0, "body_timeout": 1.0,
          "keepalive_timeout": 1.5, "max_pipelined": 8}


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("http"), workers=1, limits=LIMITS).start()
    yield d.port
    d.stop()


def get(path="/healthz", extra=""):
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


def test_healthz_and_request_id(port):
    r = request(port)
    assert r.status == 200 and r.json() == {"status": "ok"}
    assert r.headers["content-type"] == "application/json" and r.headers["x-request-id"]
    r2 = request(port, headers={"X-Request-Id": "abc-123"})
    assert r2.headers["x-request-id"] == "abc-123"
    r3 = request(port, headers={"X-Request-Id": "bad id\x01"})
    assert r3.headers["x-request-id"] not in ("bad id\x01", r.headers["x-request-id"])


def test_keepalive_reuses_connection(port):
    with connect(port) as s:
        r = Reader(s)
        for _ in range(5):
            s.sendall(get())
            reply = r.read()
            assert reply.status == 200 and "connection" not in reply.headers


def test_pipelining_answers_in_order(port):
    with connect(port) as s:
        reqs = b"".join(get("/healthz", f"X-Request-Id: r{i}\r\n") if i % 2 == 0 else
                        get("/nope", f"X-Request-Id: r{i}\r\n") for i in range(6))
        s.sendall(reqs)
        r = Reader(s)
        replies = [r.read() for _ in range(6)]
    assert [x.headers["x-request-id"] for x in replies] == [f"r{i}" for i in range(6)]
    assert [x.status for x in replies] == [200, 404] * 3


def test_pipelined_async_route_keeps_order(port):
    with connect(port) as s:
        s.sendall(get("/readyz", "X-Request-Id: a\r\n") + get("/healthz", "X-Request-Id: b\r\n")
                  + get("/metrics", "X-Request-Id: c\r\n") + get("/healthz", "X-Request-Id: d\r\n"))
        r = Reader(s)
        replies = [r.read() for _ in range(4)]
    assert [x.headers["x-request-id"] for x in replies] == ["a", "b", "c", "d"]
    assert replies[0].json()["ready"] is True
    assert replies[2].headers["content-type"].startswith("text/plain")


def test_http10_closes_and_head_has_no_body(port):
    reply, closed = raw_exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert reply.status == 200 and closed
    with connect(port) as s:
        s.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + get())
        r = Reader(s)
        s.settimeout(2)
        while b"\r\n\r\n" not in r.buf:
            r._fill()
        first, rest = r.buf.split(b"\r\n\r\n", 1)
        assert b"content-length: 15" in first
        r.buf = rest
        assert r.read().status == 200  # the GET after HEAD parses: HEAD sent no body


def test_not_found_and_method_not_allowed(port):
    r = request(port, path="/v2/what")
    assert r.status == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert "/v2/what" in r.json()["error"]["message"]
    r = request(port, method="DELETE", path="/healthz")
    assert r.status == 405 and r.headers["allow"] == "GET, HEAD"
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_echo_json_and_chunked_body(port):
    r = request(port, "POST", "/v1/echo", b'{"x": [1, 2.5, "three"]}')
    assert r.status == 200 and r.json() == {"object": "echo", "data": {"x": [1, 2.5, "three"]}}
    body = b'{"chunked": true}'
    raw = (b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"%x\r\n%s\r\n" % (5, body[:5]) + b"%x\r\n%s\r\n" % (len(body) - 5, body[5:]) + b"0\r\n\r\n")
    reply, closed = raw_exchange(port, raw)
    assert reply.status == 200 and reply.json()["data"] == {"chunked": True} and not closed


def test_expect_100_continue(port):
    with connect(port) as s:
        s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        s.settimeout(3)
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"{}")
        assert Reader(s).read().status == 200


@pytest.mark.parametrize("body, code", [
    (b"", "invalid_json"),
    (b"{not json", "invalid_json"),
    (b"[" * 9 + b"]" * 9, "json_too_deep"),
    (b"[" * 50000 + b"]" * 50000, "json_too_deep"),  # would be a RecursionError-class problem unguarded
    (b"[1234567890123]", "json_number_too_long"),
], ids=["empty", "malformed", "deep", "very_deep", "long_number"])
def test_json_limits(port, body, code):
    r = request(port, "POST", "/v1/echo", body, headers={"Connection": "keep-alive"}) if len(body) < 4096 else None
    if r is None:  # larger than max_body_bytes: still a clean 413, never a crash
        r = request(port, "POST", "/v1/echo", body)
        assert r.status == 413
        return
    assert r.status == 400 and r.json()["error"]["code"] == code, r.body


def test_wrong_content_type_is_415(port):
    r = request(port, "POST", "/v1/echo", b"a=b", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 415


@pytest.mark.parametrize("raw, status, code", [
    (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "uri_too_long"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 1100 + b"\r\n\r\n", 431, "header_too_large"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(12)) + b"\r\n", 431,
     "too_many_headers"),
    (b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n", 413, "body_too_large"),
    (b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"800\r\n" + b"x" * 2048 + b"\r\n" + b"800\r\n" + b"x" * 2048 + b"\r\n" + b"800\r\n" + b"x" * 2048 + b"\r\n0\r\n\r\n",
     413, "body_too_large"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_framing"),  # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_framing"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nExpect: magic\r\n\r\n", 417, "bad_expect"),
], ids=["uri", "header_bytes", "header_count", "content_length", "chunked_body", "no_host", "two_hosts", "expect"])
def test_limits_answer_and_close(port, raw, status, code):
    reply, closed = raw_exchange(port, raw)
    assert reply.status == status and reply.json()["error"]["code"] == code
    assert closed


SMUGGLING = {
    "cl_and_te": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2\r\n{}\r\n0\r\n\r\n",
    "te_and_cl": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
                 b"2\r\n{}\r\n0\r\n\r\n",
    "duplicate_cl": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    "conflicting_cl": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{} ",
    "cl_list": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2, 2\r\n\r\n{}",
    "cl_sign": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: +2\r\n\r\n{}",
    "cl_hex": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 0x2\r\n\r\n{}",
    "te_gzip": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n{}",
    "te_gzip_chunked": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "te_chunked_twice": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"2\r\n{}\r\n0\r\n\r\n",
    "te_identity": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\n\r\n{}",
    "te_space_before_colon": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "obs_fold": b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: b\r\n c\r\n\r\n",
    "obs_fold_te": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\r\n chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "bare_lf_chunk_size": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\n{}\r\n0\r\n\r\n",
    "bare_lf_chunk_data": b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\n0\r\n\r\n",
    "bare_lf_request_line": b"GET /healthz HTTP/1.1\nHost: t\n\n",
    "nul_in_header": b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_rejected_with_400_and_close(port, name):
    reply, closed = raw_exchange(port, SMUGGLING[name])
    assert reply.status == 400, (name, reply.status, reply.body)
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert closed


def test_error_after_good_pipelined_requests(port):
    with connect(port) as s:
        s.sendall(get() + get() + SMUGGLING["cl_and_te"])
        r = Reader(s)
        assert [r.read().status for _ in range(3)] == [200, 200, 400]
        assert r.closed()


def test_header_timeout_408(port):
    with connect(port) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # never finishes the head
        r = Reader(s)
        s.settimeout(5)
        reply = r.read()
        assert reply.status == 408 and reply.json()["error"]["code"] == "header_timeout"
        assert r.closed()


def test_body_timeout_408(port):
    with connect(port) as s:
        s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n{}")
        s.settimeout(5)
        reply = Reader(s).read()
        assert reply.status == 408 and reply.json()["error"]["code"] == "body_timeout"


def test_idle_keepalive_is_closed(port):
    with connect(port) as s:
        s.sendall(get())
        r = Reader(s)
        assert r.read().status == 200
        t0 = time.time()
        assert r.closed(timeout=5)
        assert time.time() - t0 >= 1.0  # keepalive_timeout 1.5 s at one-second sweep granularity


def test_garbage_never_crashes_worker(port):
    for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\r\n\r\n\r\n", b"GET\r\n\r\n",
                 b"GET / HTTP/9.9\r\n\r\n", b"\xff" * 100 + b"\r\n\r\n"):
        with connect(port) as s:
            s.sendall(junk)
            r = Reader(s)
            try:
                reply = r.read()
                assert reply.status == 400
            except ConnectionError:
                pass
    assert request(port).status == 200


def test_slow_reader_is_cut_after_send_timeout(daemon_factory):
    d = daemon_factory(limits={"send_timeout": 1.0, "write_buffer_bytes": 65536, "max_body_bytes": 600000})
    payload = json.dumps({"pad": "x" * 500000}).encode()
    req = (b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
           % len(payload)) + payload
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", d.port))
    s.settimeout(10)
    try:
        for _ in range(30):  # ~15 MB of answers that we never read
            s.sendall(req)
    except (BrokenPipeError, ConnectionResetError):
        pass
    time.sleep(3.5)
    got = 0
    try:
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    assert got < 30 * len(payload)  # cut off well before all answers were delivered
    assert any(e.get("event") == "connection aborted" for e in d.events())
    assert request(d.port).status == 200


def test_max_connections_evicts_idle_ones_and_pauses_when_all_are_busy(daemon_factory):
    d = daemon_factory(server={"max_connections": 3})
    socks = [connect(d.port) for _ in range(3)]
    for s in socks:
        s.sendall(get())
        assert Reader(s).read().status == 200
    # three idle keep-alives: a fourth connection evicts the oldest of them and is served at once
    extra = connect(d.port, timeout=5)
    extra.sendall(get())
    assert Reader(extra).read().status == 200
    assert Reader(socks[0]).closed()
    # three uploads in progress: nothing may be evicted, so the next connection waits in the backlog
    busy = socks[1:] + [extra]
    for s in busy:
        s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10\r\n\r\n[1,")
    time.sleep(0.2)
    over = connect(d.port, timeout=5)  # accepted, finds nothing to evict: accepting pauses (one over)
    over.sendall(get())
    assert Reader(over).read().status == 200
    waiting = connect(d.port, timeout=0.7)  # completes in the kernel backlog, not accepted
    waiting.sendall(get())
    with pytest.raises(socket.timeout):
        waiting.recv(100)
    busy[0].close()
    busy[1].close()
    over.close()
    waiting.settimeout(5)
    assert Reader(waiting).read().status == 200
    for s in socks + [extra, waiting]:
        s.close()


def test_slowloris_at_four_times_max_connections_does_not_lock_out_a_normal_client(daemon_factory):
    """Over max_connections a new connection evicts the slowest header-sender or the oldest idle
    keep-alive, so a normal client is served promptly while the attack churns itself out."""
    from helpers.slowloris import Slowloris, latencies
    d = daemon_factory(workers=1, server={"max_connections": 100})
    with Slowloris(d.port, 400) as attack:
        time.sleep(1.5)
        got = latencies(d.port, 30)
    assert all(t < 5.0 for t in got), got  # none timed out
    assert attack.reconnects > 0  # the server did push attackers out
    text = request(d.port, path="/metrics").body.decode()
    assert "tidegate_connections_evicted_total" in text
