# cython: language_level=3, boundscheck=False, wraparound=False
"""HTTP/1.1 on the per-request hot path: Request, Response, HttpError and the connection.

`HttpConnection` is the asyncio Protocol that frames requests with llhttp (httptools). All of
these are extension types so that the hot path touches C fields, not attribute dictionaries;
limits are copied into C integers once per connection. The logic is plain: llhttp
calls back per request part; a complete `Request` is queued in `pending`; `_process` answers the
queue strictly in order through the delegate (`HttpServer.dispatch`), parking while an async
handler runs. Limits raise `HttpError`; framing errors and limits are answered (after the
requests parsed before them) and the connection closes. Time-outs are enforced by
`HttpServer.tick`, a once-a-second sweep, which reads `phase`, `since` and `paused_since`.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

import asyncio
import heapq
import http
import os
import socket
import time
from collections import deque

import httptools
import orjson

# a leaf: nothing from tidegate.core is imported here; the logger and the metrics object (with its
# latency buckets) are handed to HttpServer by the worker

REASONS = {s.value: s.phrase for s in http.HTTPStatus}
STATUS_LINES = {code: f"HTTP/1.1 {code} {phrase}\r\n".encode() for code, phrase in REASONS.items()}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 504: "timeout_error", 405: "invalid_request_error", 408: "timeout_error",
               413: "invalid_request_error", 414: "invalid_request_error", 415: "invalid_request_error",
               417: "invalid_request_error",
               429: "rate_limit_error", 431: "invalid_request_error", 503: "service_unavailable_error"}

# connection phases, for the time-out sweep (HttpServer.tick)
IDLE_NEW, HEAD, BODY, BUSY, IDLE_KEEPALIVE = range(5)


@cython.final
cdef class Response:
    """What a handler returns. `head()` caches the status line and the headers that depend only on
    this response, so a constant Response (e.g. /healthz) costs one concatenation per request."""
    cdef public int status
    cdef public bytes body, content_type
    cdef public object headers
    cdef bytes _head

    def __init__(self, int status=200, bytes body=b"", bytes content_type=b"application/json", headers=None):
        self.status, self.body, self.content_type, self.headers = status, body, content_type, headers

    def head(self):
        return self._build_head()

    cdef bytes _build_head(self):
        if self._head is not None:
            return self._head
        status_line = STATUS_LINES.get(self.status)
        if status_line is None:
            status_line = f"HTTP/1.1 {self.status} Unknown\r\n".encode()
        if self.headers is None:  # the common case, assembled in one allocation
            self._head = _head_bytes(status_line, self.content_type, PyBytes_GET_SIZE(self.body))
        else:
            parts = [_head_bytes(status_line, self.content_type, PyBytes_GET_SIZE(self.body))]
            for name, value in self.headers:
                parts += (name, b": ", value, b"\r\n")
            self._head = b"".join(parts)
        return self._head


cdef class HttpConnection
cdef class Request


cdef class Stream:
    """A streamed answer (SSE): a handler returns one (directly or from a future), the connection
    writes the head with chunked framing, then the producer calls write() per chunk and end()
    once. Writes before the connection has taken the stream are kept and sent after the head.
    While it streams, the connection is busy: pipelined requests wait their turn. on_close()
    runs if the client goes away first, so the producer can stop (cancel a sequence).
    Flow control: `backed_up` is true while the client's connection holds more unsent bytes than
    its high-water mark; a producer that waits sets on_drain, called once when it drains."""
    cdef public int status
    cdef public bytes content_type
    cdef public object headers, on_close, on_drain
    cdef public bint finished
    cdef public object sink  # set when the stream goes elsewhere than an HTTP answer (a WebSocket reply)
    cdef HttpConnection conn
    cdef Request req
    cdef bint chunked
    cdef list early

    def __init__(self, int status=200, bytes content_type=b"text/event-stream", headers=None, on_close=None):
        self.status, self.content_type, self.headers, self.on_close = status, content_type, headers, on_close
        self.early = []

    @property
    def closed(self):
        """True once the client is gone (or the stream ended): stop producing."""
        if self.sink is not None:
            return self.finished or self.sink.closed
        return self.finished or (self.conn is not None and self.conn.closing)

    @property
    def backed_up(self):
        if self.sink is not None:
            return self.sink.backed_up
        return self.conn is not None and self.conn.paused_since != 0.0

    def to_sink(self, sink):
        """Send the stream elsewhere than an HTTP answer (sink.write/end/closed/backed_up: one
        WebSocket request's replies), with what was written before it was attached."""
        self.sink = sink
        early, self.early = self.early, None
        for data in early or ():
            sink.write(data)
        if self.finished:
            sink.end()

    def drained(self):
        """The connection drained below its low-water mark: wake a producer that waits."""
        cb, self.on_drain = self.on_drain, None
        if cb is not None and not self.finished:
            cb()

    def write(self, bytes data):
        if self.finished or not data:
            return
        if self.sink is not None:  # .write(data) / .end() / .closed: e.g. one WebSocket request's replies
            self.sink.write(data)
            return
        if self.conn is None:
            self.early.append(data)
        elif not self.conn.closing:
            self._emit(data)

    cdef _emit(self, bytes data):
        if self.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self.conn.transport.write(data)
        self.conn.srv.bytes_out += len(data)

    def end(self):
        if self.finished:
            return
        self.finished = True
        if self.sink is not None:
            self.sink.end()
        elif self.conn is not None:
            self._close_out()

    cdef _attached(self, HttpConnection conn, Request req):
        self.conn, self.req = conn, req
        for data in self.early:
            self._emit(data)
        self.early = None
        if self.finished:
            self._close_out()

    cdef _close_out(self):
        conn = self.conn
        if conn.closing:
            return
        if self.chunked:
            conn.transport.write(b"0\r\n\r\n")
        conn._end_stream(self.req, self)


@cython.final
cdef class Upgrade:
    """What a handler returns to take the connection over (a WebSocket): the connection writes
    `101 Switching Protocols` with these headers, then hands its transport to
    `protocol_factory(transport, request, tail)` (tail: bytes that arrived after the request) and
    leaves HTTP for good. Only for a request that asked to upgrade; else it is a 400."""
    cdef public object protocol_factory
    cdef public list headers

    def __init__(self, protocol_factory, list headers):
        self.protocol_factory, self.headers = protocol_factory, headers


cdef bytes _head_bytes(bytes status_line, bytes content_type, Py_ssize_t length):
    """status line + content-type + content-length, written with memcpy into one bytes object."""
    cdef char digits[24]
    cdef int nd = 24
    cdef Py_ssize_t v = length
    while True:
        nd -= 1
        digits[nd] = 48 + v % 10
        v //= 10
        if v == 0:
            break
    cdef Py_ssize_t ls = PyBytes_GET_SIZE(status_line), lc = PyBytes_GET_SIZE(content_type), ndig = 24 - nd
    cdef bytes out = PyBytes_FromStringAndSize(NULL, ls + 14 + lc + 18 + ndig + 2)
    cdef char* p = PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(status_line), ls)
    p += ls
    memcpy(p, b"content-type: ", 14)
    p += 14
    memcpy(p, PyBytes_AS_STRING(content_type), lc)
    p += lc
    memcpy(p, b"\r\ncontent-length: ", 18)
    p += 18
    memcpy(p, digits + nd, ndig)
    p += ndig
    memcpy(p, b"\r\n", 2)
    return out


@cython.final
cdef class Request:
    """One parsed request, as the delegate sees it."""
    cdef public str method, path, version, route
    cdef public bytes query, body, request_id
    cdef public dict headers
    cdef public dict params  # a pattern route's {name} segments, %-decoded (core/http/router.py); else None
    cdef public bint keep_alive
    cdef public double started
    cdef public object identity  # set by the guard (workers/ingress/guard.py)
    cdef public object on_close  # set by a handler that must hear if the client leaves before the answer
    cdef object _transport

    @property
    def peer(self) -> str:
        """The client's address ("" when unknown: a unix socket, a request made inside)."""
        t = self._transport
        name = t.get_extra_info("peername") if t is not None else None
        return name[0] if isinstance(name, tuple) and name else ""


cpdef Response json_response(obj, int status=200, headers=None):
    """A JSON Response (orjson), built without a Python-level constructor call."""
    cdef Response r = Response.__new__(Response)
    r.status, r.body, r.content_type, r.headers = status, orjson.dumps(obj), b"application/json", headers
    return r


class HttpError(Exception):
    """Raised anywhere in request handling; becomes an OpenAI-shaped JSON error response."""

    def __init__(self, status, message, code=None, headers=None, param=None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.param = status, message, code, headers, param

    def body(self):
        return {"error": {"type": ERROR_TYPES.get(self.status, "server_error"), "message": self.message,
                          "param": self.param, "code": self.code}}

    def response(self):
        body = self.body()
        return Response(self.status, orjson.dumps(body), b"application/json", self.headers)


class _Failure:
    """A framing error queued behind the requests parsed before it, so answers stay in order."""
    __slots__ = ("error",)

    def __init__(self, error):
        self.error = error


cdef object _perf = time.perf_counter
cdef object _Future = asyncio.Future
cdef object _HttpParserError = httptools.HttpParserError
cdef object _HttpParserUpgrade = httptools.HttpParserUpgrade
cdef dict _METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
cdef frozenset _RID_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
cdef Py_ssize_t _READ_SLACK = 256 * 1024  # one event-loop read may carry earlier pipelined requests too
# lower-case forms of the header names clients send most, to skip a bytes.lower() per header
cdef dict _CANON = {n.encode(): n.lower().encode() for n in (
    "Host", "host", "Content-Type", "content-type", "Content-Length", "content-length", "User-Agent",
    "user-agent", "Accept", "accept", "Connection", "connection", "Authorization", "authorization",
    "Accept-Encoding", "accept-encoding", "X-Request-Id", "x-request-id", "Transfer-Encoding",
    "transfer-encoding", "Expect", "expect")}
# request ids: a random per-process prefix and a counter, unique across workers and restarts
cdef bytes _RID_PREFIX = os.urandom(6).hex().encode() + b"-"
cdef unsigned long long _rid_counter = 0
cdef int _IDLE_NEW = IDLE_NEW, _HEAD = HEAD, _BODY = BODY, _BUSY = BUSY, _IDLE_KEEPALIVE = IDLE_KEEPALIVE


cdef class HttpServer


cdef class HttpConnection:
    cdef public HttpServer srv
    cdef public object transport, parser, pending
    cdef public int phase
    cdef public double since, paused_since
    cdef public double body_since  # when its request head ended (the body's rate is measured from it)
    cdef public unsigned long long serial  # accept order: the lowest still sending its head is the slowest
    cdef public bint busy, closing, read_paused
    cdef object metrics, _url, _headers, _body, _started, _version, _parked, _stream, _upgrade_tail
    cdef bint _in_message, kernel_capped
    cdef Py_ssize_t _nheaders, _hbytes, _blen, _raw_head
    cdef Py_ssize_t max_request_line, max_header_bytes, max_headers, max_body_bytes, max_pipelined

    def __init__(self, HttpServer srv):
        self.srv = srv
        self.metrics = srv.metrics
        lim = srv.limits
        self.max_request_line = lim["max_request_line"]
        self.max_header_bytes = lim["max_header_bytes"]
        self.max_headers = lim["max_headers"]
        self.max_body_bytes = lim["max_body_bytes"]
        self.max_pipelined = lim["max_pipelined"]
        self.pending = deque()
        self.transport = None
        self.parser = None

    # ---- transport events -------------------------------------------------------------------
    def connection_made(self, transport):
        srv = self.srv
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.phase, self.since = _IDLE_NEW, srv.now
        transport.set_write_buffer_limits(high=srv.limits["write_buffer_bytes"])
        srv.conns.add(self)
        srv.connections_accepted += 1
        self.serial = srv.connections_accepted
        if srv.on_count_change is not None:
            srv.on_count_change(len(srv.conns) + srv.upgraded, self)

    def connection_lost(self, exc):
        self.closing = True
        st, self._stream = self._stream, None
        if st is not None and st.on_close is not None and not st.finished:
            st.on_close()  # the client left mid-stream: let the producer stop
        req = self._parked
        if req is not None and req.on_close is not None:
            req.on_close()  # the client left while its answer was being computed
        srv = self.srv
        srv.conns.discard(self)
        self.pending.clear()
        if srv.on_count_change is not None:
            srv.on_count_change(len(srv.conns) + srv.upgraded, None)

    def eof_received(self):
        return False  # close our side too

    def data_received(self, bytes data):
        if self.closing or self.parser is None:
            return
        self.srv.bytes_in += len(data)
        try:
            self.parser.feed_data(data)
        except HttpError as e:
            self._fail(e)
        except _HttpParserUpgrade as e:
            # the request asked to switch protocols: its handler may take the connection over
            # (returns an Upgrade); otherwise it is answered and the connection closes
            self._upgrade_tail = data[e.args[0]:] if e.args else b""
            if self.pending:  # (wraparound is off here: no [-1])
                self.pending[len(self.pending) - 1].keep_alive = False
            self._stop_reading()
        except _HttpParserError as e:
            # an HttpError raised in one of our callbacks comes back wrapped as its __context__
            cause = e.__context__
            self._fail(cause if isinstance(cause, HttpError) else
                       HttpError(400, f"malformed HTTP request: {e}", "bad_framing"))
        else:
            if self.phase == _HEAD:
                # llhttp buffers a header line until it ends: bound what an unfinished head may hold
                self._raw_head += len(data)
                if self._raw_head > self.max_header_bytes + self.max_request_line + _READ_SLACK:
                    self._fail(HttpError(431, "request header section too large", "header_too_large"))
        if not self.busy:
            self._process()

    def pause_writing(self):
        self.paused_since = self.srv.now or 1.0

    def resume_writing(self):
        self.paused_since = 0.0
        if self._stream is not None:
            self._stream.drained()
        if not self.busy:
            self._process()

    # ---- llhttp callbacks ---------------------------------------------------------------------
    def on_url(self, bytes url):
        if not self._in_message:  # first callback of a request (cheaper than on_message_begin)
            self._in_message = True
            self.phase, self.since = _HEAD, self.srv.now
            self._raw_head = 0
            self._url = url
            self._headers = {}
            self._nheaders = 0
            self._hbytes = 0
            self._body = None
            self._blen = 0
            self._started = _perf()
        else:
            self._url += url
        if len(self._url) > self.max_request_line:
            raise HttpError(414, f"request target longer than {self.max_request_line} bytes", "uri_too_long")

    def on_header(self, bytes name, bytes value):
        self._nheaders += 1
        self._hbytes += len(name) + len(value) + 4
        if self._nheaders > self.max_headers:
            raise HttpError(431, f"more than {self.max_headers} header fields", "too_many_headers")
        if self._hbytes > self.max_header_bytes:
            raise HttpError(431, f"header section larger than {self.max_header_bytes} bytes", "header_too_large")
        canon = _CANON.get(name)
        name = canon if canon is not None else name.lower()
        if name == b"transfer-encoding" and value.strip().lower() != b"chunked":
            # llhttp accepts codings like "gzip, chunked"; we decode none of them
            raise HttpError(400, "unsupported Transfer-Encoding: only 'chunked' is accepted", "bad_framing")
        headers = self._headers
        if name in headers:
            if name == b"host":
                raise HttpError(400, "duplicate Host header", "bad_framing")
            headers[name] += b", " + value
        else:
            headers[name] = value

    def on_headers_complete(self):
        self.phase, self.since = _BODY, self.srv.now
        self.body_since = self.srv.now
        headers = self._headers
        if b"host" not in headers and self.parser.get_http_version() == "1.1":
            raise HttpError(400, "missing Host header", "bad_framing")
        cl = headers.get(b"content-length")
        if cl is not None and int(cl) > self.max_body_bytes:
            raise HttpError(413, f"request body larger than {self.max_body_bytes} bytes", "body_too_large")
        early = self.srv.early
        if early is not None and cl is not None and int(cl) >= self.srv.early_bytes:
            err = early(self._url, headers)  # shed before reading a large body (the delegate decides)
            if err is not None:
                raise err
        expect = headers.get(b"expect")
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise HttpError(417, "only 'Expect: 100-continue' is supported", "bad_expect")
            if not self.pending and not self.busy:
                # with earlier requests unanswered a 100 would overtake their answers; the
                # client then sends the body after its own wait (RFC 9110 10.1.1)
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, bytes body):
        self.since = self.srv.now
        self._blen += len(body)
        if self._blen > self.max_body_bytes:
            raise HttpError(413, f"request body larger than {self.max_body_bytes} bytes", "body_too_large")
        if self._body is None:
            self._body = [body]
        else:
            self._body.append(body)

    def on_message_complete(self):
        self._in_message = False
        self.phase = _BUSY
        parser = self.parser
        cdef Request req = Request.__new__(Request)
        req._transport = self.transport
        method = parser.get_method()
        req.method = _METHODS.get(method) or method.decode("latin-1")
        url = self._url
        if url[:1] != b"/":
            if url == b"*" or not url.startswith((b"http://", b"https://")):
                raise HttpError(400, "request target must be a path", "bad_target")
            parsed = httptools.parse_url(url)
            url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        if b"?" in url:
            path, _, req.query = url.partition(b"?")
            req.path = path.decode("latin-1")
        else:
            req.path = url.decode("latin-1")
            req.query = b""
        req.headers = self._headers
        body = self._body
        req.body = b"" if body is None else (body[0] if len(body) == 1 else b"".join(body))
        req.keep_alive = parser.should_keep_alive()
        if self._version is None:  # str.format per call in httptools: once per connection is enough
            self._version = parser.get_http_version()
        req.version = self._version
        rid = self._headers.get(b"x-request-id")
        req.request_id = (rid if rid is not None and len(rid) <= 128 and _RID_OK.issuperset(rid)
                          else next_request_id())
        req.started = self._started
        req.route = "unmatched"
        self._headers = self._url = self._body = None  # an idle connection keeps nothing of its last request
        if len(self.pending) >= self.max_pipelined:
            # one read can carry more requests than the limit: the excess is refused, after the
            # answers to those before it, and the connection closes
            raise HttpError(400, f"more than {self.max_pipelined} pipelined requests without reading the answers",
                            "too_many_pipelined")
        self.pending.append(req)
        if len(self.pending) >= self.max_pipelined:
            self._stop_reading()

    # ---- answering --------------------------------------------------------------------------
    cdef _process(self):
        """Answer queued requests in order until one needs to wait."""
        pending = self.pending
        routes = self.srv.routes
        cdef Request req
        while pending and not self.busy and not self.closing and not self.paused_since:
            item = pending.popleft()
            if type(item) is _Failure:
                self._send_error(item.error)
                return
            req = item
            try:
                methods = routes.get(req.path)
                handler = methods.get(req.method) if methods is not None else None
                if handler is not None:
                    req.route = req.path
                    resp = handler(req)
                else:  # patterns, HEAD-for-GET, 404, 405: the router's full dispatch
                    resp = self.srv.dispatch(req)
            except HttpError as e:
                resp = e.response()
            except Exception as e:  # a handler bug must not take the worker down
                self.srv.log.error("handler failed", route=req.route, error=repr(e))
                resp = HttpError(500, "internal error", "internal").response()
            if type(resp) is Stream:
                self._start_stream(req, resp)
                return
            if type(resp) is Upgrade:
                self._start_upgrade(req, resp)
                return
            if type(resp) is not Response:
                # park until it resolves: a future directly (no Task), a coroutine as a Task
                self.busy = True
                self._parked = req
                if not isinstance(resp, _Future):
                    resp = asyncio.ensure_future(resp)
                resp.add_done_callback(self._on_future)
                return
            self._send(req, resp)
        if self.read_paused and not self.closing and len(pending) < self.max_pipelined:
            self.read_paused = False
            self.transport.resume_reading()
        if not pending and not self._in_message and not self.busy:
            self.phase, self.since = _IDLE_KEEPALIVE, self.srv.now

    def _on_future(self, fut):
        req, self._parked = self._parked, None
        try:
            resp = fut.result()
        except HttpError as e:
            resp = e.response()
        except BaseException as e:
            self.srv.log.error("handler failed", route=req.route, error=repr(e))
            resp = HttpError(500, "internal error", "internal").response()
        self.busy = False
        if self.closing:
            return
        if type(resp) is Stream:
            self._start_stream(req, resp)
            return
        if type(resp) is Upgrade:
            self._start_upgrade(req, resp)
            return
        self._send(req, resp)
        self._process()

    cdef _start_stream(self, Request req, Stream st):
        """Write a streamed answer's head; the connection stays busy until st.end()."""
        self.busy = True
        self._stream = st
        st.chunked = req.version != "1.0"
        status_line = STATUS_LINES.get(st.status) or f"HTTP/1.1 {st.status} Unknown\r\n".encode()
        parts = [status_line, b"content-type: ", st.content_type, b"\r\ncache-control: no-cache\r\n",
                 b"transfer-encoding: chunked\r\n" if st.chunked else b"connection: close\r\n"]
        for name, value in st.headers or ():
            parts += (name, b": ", value, b"\r\n")
        parts += (self.srv.date_line, b"x-request-id: ", req.request_id, b"\r\n\r\n")
        data = b"".join(parts)
        self.transport.write(data)
        self.srv.bytes_out += len(data)
        self._cap_kernel_buffer()
        st._attached(self, req)

    cdef _cap_kernel_buffer(self):
        """A connection that streams (SSE, an upgrade) gets a fixed SO_SNDBUF of
        limits.stream_send_buffer: else the kernel's autotuning may hold MiBs for a slow reader
        before the transport's high-water mark, and so the stream's flow control, sees any."""
        n = self.srv.limits.get("stream_send_buffer", 0)
        if n and not self.kernel_capped:
            self.kernel_capped = True
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, n)

    cdef _start_upgrade(self, Request req, Upgrade up):
        """101, then the transport belongs to the new protocol; this connection is done."""
        if self._upgrade_tail is None or self.pending:
            self._send(req, HttpError(400, "this request did not ask to upgrade the connection (or was pipelined)",
                                      "bad_upgrade").response())
            return
        parts = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in up.headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (self.srv.date_line, b"x-request-id: ", req.request_id, b"\r\n\r\n")
        data = b"".join(parts)
        self.transport.write(data)
        srv = self.srv
        srv.bytes_out += len(data)
        observe(self.metrics, req.route, 101, _perf() - req.started)
        tail, self._upgrade_tail = self._upgrade_tail, None
        self._cap_kernel_buffer()
        transport = self.transport
        self.closing = True  # (no more HTTP here: the new protocol hears connection_lost)
        self.parser = None
        srv.conns.discard(self)
        proto = up.protocol_factory(transport, req, tail)
        transport.set_protocol(proto)
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()

    def _end_stream(self, Request req, Stream st):
        self._stream = None
        self.busy = False
        observe(self.metrics, req.route, st.status, _perf() - req.started)
        if not st.chunked or not req.keep_alive or self.srv.draining or self.srv.no_keepalive:
            self.close()
            return
        self._process()

    cdef _send(self, Request req, Response resp):
        cdef HttpServer srv = self.srv
        cdef bint keep = req.keep_alive and not srv.draining and not srv.no_keepalive
        if keep:
            tail = b"\r\n\r\n" if req.version != "1.0" else b"\r\nconnection: keep-alive\r\n\r\n"
        else:
            tail = b"\r\nconnection: close\r\n\r\n"
        cdef bytes data = _concat5(resp._build_head(), srv.date_line, b"x-request-id: " + req.request_id, tail,
                                   resp.body if req.method != "HEAD" else b"")
        self.transport.write(data)
        srv.bytes_out += len(data)
        observe(self.metrics, req.route, resp.status, _perf() - req.started)
        if srv.access_log:
            srv.log.info("access", method=req.method, path=req.path, status=resp.status, request_id=req.request_id,
                     ms=round((_perf() - req.started) * 1000, 3))
        if not keep:
            self.close()

    cdef _send_error(self, err):
        cdef Request req = Request.__new__(Request)
        req.method, req.version, req.keep_alive, req.route = "GET", "1.1", False, "-"
        req.request_id = next_request_id()
        req.started = _perf()
        self._send(req, err.response())

    cdef _fail(self, err):
        """A framing or limit error: answer it after what was parsed before it, then close."""
        self._stop_reading()
        self.parser = None
        self.pending.append(_Failure(err))

    def fail_now(self, err):
        self._fail(err)
        self._process()

    cdef _stop_reading(self):
        if not self.read_paused and not self.closing:
            self.read_paused = True
            self.transport.pause_reading()

    def is_idle(self):
        """Between requests of a keep-alive connection: nothing parsed, nothing being answered."""
        return not self.pending and not self.busy and self.phase == _IDLE_KEEPALIVE

    def close(self):
        if not self.closing:
            self.closing = True
            self.transport.close()

    def abort(self, why):
        self.srv.log.info("connection aborted", reason=why)
        self.closing = True
        self.transport.abort()


cdef class HttpServer:
    """Per-worker state the connections share: limits, the delegate, counters, the coarse clock.

    `routes` is the router's exact-path table ({path: {method: handler}}), consulted first so a
    plain route costs no Python-level dispatch; everything else goes through `dispatch`.
    """
    cdef public dict limits, routes
    cdef public object dispatch, metrics, on_count_change, log, early
    cdef public Py_ssize_t early_bytes
    cdef public Py_ssize_t max_connections
    cdef public Py_ssize_t upgraded  # connections handed to another protocol (WebSockets), still open
    cdef public set conns
    cdef public bint draining, access_log, no_keepalive
    cdef public double now
    cdef public bytes date_line
    cdef public unsigned long long bytes_in, bytes_out, connections_accepted, evicted

    def __init__(self, dict limits, dispatch, metrics, log, bint access_log=False, dict routes=None):
        self.limits = limits
        self.log = log                      # .info / .error(message, **fields): the worker's JSON logger
        self.dispatch = dispatch            # Request -> Response | awaitable[Response]; sets req.route
        self.routes = routes if routes is not None else {}
        self.metrics = metrics              # .requests, .latency and .buckets: see observe()
        self.access_log = access_log
        self.conns = set()                  # HttpConnection objects
        self.draining = False
        self.no_keepalive = False           # box-level overload: close each connection after its answer
        self.early = None                   # (url, headers) -> HttpError | None, asked before a large body is read
        self.early_bytes = 0
        self.date_line = b""                # "date: ...\r\nserver: tidegate\r\n", refreshed each second
        self.on_count_change = None         # callback(n_open) for accept pausing
        self.max_connections = 0            # > 0: timeouts shorten as the count nears it (overload)
        self.tick()

    def tick(self):
        """Once a second: refresh the clock and Date header, enforce time-outs."""
        self.now = now = time.monotonic()
        self.date_line = time.strftime("date: %a, %d %b %Y %H:%M:%S GMT\r\nserver: tidegate\r\n",
                                       time.gmtime()).encode()
        lim = self.limits
        head_t, body_t, ka_t, send_t = (lim["header_timeout"], lim["body_timeout"], lim["keepalive_timeout"],
                                        lim["send_timeout"])
        # a body must average min_body_rate once header_timeout has passed: a client that dribbles
        # one byte a read (each read resets the idle timer) holds its slot no longer than that
        min_rate = lim["min_body_rate"]
        if self.no_keepalive:
            ka_t = 0.0
        if self.max_connections > 0:  # under connection pressure, slow and idle clients go first
            pressure = len(self.conns) / self.max_connections
            if pressure >= 0.9:
                head_t, body_t, ka_t = min(head_t, 1.0), min(body_t, 2.0), 0.0
            elif pressure >= 0.75:
                head_t, body_t, ka_t = min(head_t, 2.0), min(body_t, 5.0), min(ka_t, 1.0)
        cdef HttpConnection conn
        for conn in list(self.conns):
            phase, idle = conn.phase, now - conn.since
            if conn.paused_since and now - conn.paused_since > send_t:
                conn.abort("send timeout: client is not reading")
            elif conn.busy or conn.pending:
                continue
            elif phase in (_IDLE_NEW, _HEAD) and idle > head_t:
                conn.fail_now(HttpError(408, f"request header not received within {head_t:g} s",
                                        "header_timeout"))
            elif phase == _BODY and idle > body_t:
                conn.fail_now(HttpError(408, f"request body stalled for more than {body_t:g} s", "body_timeout"))
            elif phase == _BODY and min_rate > 0 and now - conn.body_since > head_t and \
                    conn._blen < min_rate * (now - conn.body_since):
                conn.fail_now(HttpError(408, f"request body slower than {min_rate:g} bytes/s (limits.min_body_rate)",
                                        "body_timeout"))
            elif phase == _IDLE_KEEPALIVE and idle > ka_t:
                conn.close()

    cdef bint _slow_body(self, HttpConnection conn):
        """Sending a body slower than limits.min_body_rate for over a second (enough to tell an
        upload from a dribble): a candidate for eviction while the server is full."""
        cdef double took = self.now - conn.body_since
        rate = self.limits["min_body_rate"]
        return conn.phase == _BODY and rate > 0 and took > 1.0 and conn._blen < rate * took

    def evictable(self, HttpConnection spare=None):
        """Is there a connection evict() could close?"""
        cdef HttpConnection conn
        for conn in self.conns:
            if conn is not spare and not conn.closing and not conn.busy and not conn.pending and (
                    conn.phase == _IDLE_KEEPALIVE or conn.phase == _IDLE_NEW or conn.phase == _HEAD or
                    self._slow_body(conn)):
                return True
        return False

    def evict(self, HttpConnection spare=None, Py_ssize_t n=1):
        """Close up to n connections that cost the most and give the least, to make room for new
        ones: the longest-idle keep-alives first, then the clients slowest to send their request
        head (what slowloris does), oldest first, then those sending a body under
        limits.min_body_rate, slowest first (one byte a read had kept a slot forever). Busy connections are never picked. One pass
        for n of them, so a flood of new connections does not pay a scan each. How many closed."""
        cdef HttpConnection conn
        idle, slow, body = [], [], []
        now = self.now
        for conn in self.conns:
            if conn is spare or conn.closing or conn.busy or conn.pending:
                continue
            if conn.phase == _IDLE_KEEPALIVE:
                idle.append((conn.since, conn.serial, conn))
            elif conn.phase == _IDLE_NEW or conn.phase == _HEAD:
                slow.append((conn.serial, conn))
            elif self._slow_body(conn):
                body.append((conn._blen / max(0.001, now - conn.body_since), conn.serial, conn))
        victims = [c for _, _, c in heapq.nsmallest(n, idle, key=_first_two)]
        if len(victims) < n:
            victims += [c for _, c in heapq.nsmallest(n - len(victims), slow, key=_first)]
        if len(victims) < n:
            victims += [c for _, _, c in heapq.nsmallest(n - len(victims), body, key=_first_two)]
        for conn in victims:
            self.evicted += 1
            if conn.phase == _HEAD:  # it sent part of a request: say why it is cut
                conn.fail_now(HttpError(408, "request header too slow while the server is full", "header_timeout"))
            elif conn.phase == _BODY:
                conn.fail_now(HttpError(408, "request body too slow while the server is full", "body_timeout"))
            else:
                conn.close()
        return len(victims)

    def drain(self):
        """Stop keeping connections alive: idle keep-alives close now, the others after their next
        answer. A connection that has not sent its first request yet is served once, not closed:
        its request may already be on the wire (closing it would reset a client that did nothing
        wrong; the header timeout bounds it)."""
        self.draining = True
        for conn in list(self.conns):
            if conn.is_idle():
                conn.close()


def _first(item):
    return item[0]


def _first_two(item):
    return item[0], item[1]


cdef bytes _concat5(bytes a, bytes b, bytes c, bytes d, bytes e):
    """a + b + c + d + e with one allocation (the response is written in one transport.write)."""
    cdef Py_ssize_t la = PyBytes_GET_SIZE(a), lb = PyBytes_GET_SIZE(b), lc = PyBytes_GET_SIZE(c)
    cdef Py_ssize_t ld = PyBytes_GET_SIZE(d), le = PyBytes_GET_SIZE(e)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, la + lb + lc + ld + le)
    cdef char* p = PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(a), la)
    memcpy(p + la, PyBytes_AS_STRING(b), lb)
    memcpy(p + la + lb, PyBytes_AS_STRING(c), lc)
    memcpy(p + la + lb + lc, PyBytes_AS_STRING(d), ld)
    memcpy(p + la + lb + lc + ld, PyBytes_AS_STRING(e), le)
    return out


cpdef bytes next_request_id():
    global _rid_counter
    _rid_counter += 1
    cdef char buf[16]
    cdef int n = 16
    cdef unsigned long long v = _rid_counter
    while True:  # hex digits, written backwards
        n -= 1
        buf[n] = b"0123456789abcdef"[v & 15]
        v >>= 4
        if v == 0:
            break
    return _RID_PREFIX + buf[n:16]


cpdef observe(metrics, str route, int status, double seconds):
    """Count one answer: metrics.requests[(route, status)] += 1 and the latency histogram
    metrics.latency[route] = [count per bucket of metrics.buckets..., +Inf count, sum of seconds]."""
    cdef dict requests = metrics.requests, latency = metrics.latency
    cdef tuple buckets = metrics.buckets
    cdef Py_ssize_t nb = len(buckets)
    key = (route, status)
    requests[key] = requests.get(key, 0) + 1
    h = latency.get(route)
    if h is None:
        h = latency[route] = [0] * (nb + 1) + [0.0]
    cdef Py_ssize_t i = 0
    while i < nb and seconds > <double>buckets[i]:
        i += 1
    h[i] += 1
    h[nb + 1] += seconds
