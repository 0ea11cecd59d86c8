# cython: language_level=3, boundscheck=False, wraparound=False
"""One HTTP/1.1 connection: the asyncio Protocol that frames requests with llhttp (httptools).

This is the per-request hot path of an ingress worker, so it is an extension type: fields are C
slots and limits are copied into C integers once per connection. The logic is plain: llhttp
calls back per request part; a complete `Request` is queued in `pending`; `_process` answers the
queue strictly in order through the delegate (`HttpServer.dispatch`), parking while an async
handler runs. Limits raise `HttpError`; framing errors and limits are answered (after the
requests parsed before them) and the connection closes. Time-outs are enforced by
`HttpServer.tick`, a once-a-second sweep, which reads `phase`, `since` and `paused_since`.
"""
import asyncio
import os
import time
from collections import deque

import httptools

from tidegate.core.http11 import (BODY, BUSY, HEAD, IDLE_KEEPALIVE, IDLE_NEW, HttpError, Request, Response,
                                  _Failure)
from tidegate.core.jsonlog import log
from tidegate.core.metrics import LATENCY_BUCKETS

cdef object _perf = time.perf_counter
cdef object _HttpParserError = httptools.HttpParserError
cdef object _HttpParserUpgrade = httptools.HttpParserUpgrade
cdef dict _METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
cdef frozenset _RID_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
cdef Py_ssize_t _READ_SLACK = 256 * 1024  # one event-loop read may carry earlier pipelined requests too
cdef tuple _BUCKETS = LATENCY_BUCKETS
cdef Py_ssize_t _NBUCKETS = len(LATENCY_BUCKETS)
# request ids: a random per-process prefix and a counter, unique across workers and restarts
cdef bytes _RID_PREFIX = os.urandom(6).hex().encode() + b"-"
cdef unsigned long long _rid_counter = 0
cdef int _IDLE_NEW = IDLE_NEW, _HEAD = HEAD, _BODY = BODY, _BUSY = BUSY, _IDLE_KEEPALIVE = IDLE_KEEPALIVE


cdef class HttpConnection:
    cdef public object srv, transport, parser, pending
    cdef public int phase
    cdef public double since, paused_since
    cdef public bint busy, closing, read_paused
    cdef object metrics, _url, _headers, _body, _started
    cdef bint _in_message
    cdef Py_ssize_t _nheaders, _hbytes, _blen, _raw_head
    cdef Py_ssize_t max_request_line, max_header_bytes, max_headers, max_body_bytes, max_pipelined

    def __init__(self, srv):
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
        self.metrics.connections_accepted += 1
        if srv.on_count_change is not None:
            srv.on_count_change(len(srv.conns))

    def connection_lost(self, exc):
        self.closing = True
        srv = self.srv
        srv.conns.discard(self)
        self.pending.clear()
        if srv.on_count_change is not None:
            srv.on_count_change(len(srv.conns))

    def eof_received(self):
        return False  # close our side too

    def data_received(self, bytes data):
        if self.closing or self.parser is None:
            return
        self.metrics.bytes_in += len(data)
        try:
            self.parser.feed_data(data)
        except HttpError as e:
            self._fail(e)
        except _HttpParserUpgrade:
            # Upgrades (WebSocket) are not served yet: answer the request, then close.
            if self.pending:
                self.pending[-1].keep_alive = False
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
        name = name.lower()
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
        headers = self._headers
        if b"host" not in headers and self.parser.get_http_version() == "1.1":
            raise HttpError(400, "missing Host header", "bad_framing")
        cl = headers.get(b"content-length")
        if cl is not None and int(cl) > self.max_body_bytes:
            raise HttpError(413, f"request body larger than {self.max_body_bytes} bytes", "body_too_large")
        expect = headers.get(b"expect")
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise HttpError(417, "only 'Expect: 100-continue' is supported", "bad_expect")
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
        req = Request()
        method = parser.get_method()
        req.method = _METHODS.get(method) or method.decode("latin-1")
        url = self._url
        if url[:1] != b"/":
            if url == b"*" or not url.startswith((b"http://", b"https://")):
                raise HttpError(400, "request target must be a path", "bad_target")
            parsed = httptools.parse_url(url)
            url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        path, _, query = url.partition(b"?")
        req.path = path.decode("latin-1")
        req.query = query
        req.headers = self._headers
        body = self._body
        req.body = b"" if body is None else (body[0] if len(body) == 1 else b"".join(body))
        req.keep_alive = parser.should_keep_alive()
        req.version = parser.get_http_version()
        rid = self._headers.get(b"x-request-id")
        req.request_id = (rid if rid is not None and len(rid) <= 128 and _RID_OK.issuperset(rid)
                          else next_request_id())
        req.started = self._started
        req.route = "unmatched"
        self._headers = self._url = self._body = None  # an idle connection keeps nothing of its last request
        self.pending.append(req)
        if len(self.pending) >= self.max_pipelined:
            self._stop_reading()

    # ---- answering --------------------------------------------------------------------------
    cdef _process(self):
        """Answer queued requests in order until one needs to wait."""
        pending = self.pending
        dispatch = self.srv.dispatch
        while pending and not self.busy and not self.closing and not self.paused_since:
            req = pending.popleft()
            if type(req) is _Failure:
                self._send_error(req.error)
                return
            try:
                resp = dispatch(req)
            except HttpError as e:
                resp = e.response()
            except Exception as e:  # a handler bug must not take the worker down
                log.error("handler failed", route=req.route, error=repr(e))
                resp = HttpError(500, "internal error", "internal").response()
            if type(resp) is not Response:
                self.busy = True
                asyncio.ensure_future(self._await(req, resp))
                return
            self._send(req, resp)
        if self.read_paused and not self.closing and len(pending) < self.max_pipelined:
            self.read_paused = False
            self.transport.resume_reading()
        if not pending and not self._in_message and not self.busy:
            self.phase, self.since = _IDLE_KEEPALIVE, self.srv.now

    async def _await(self, req, awaitable):
        try:
            resp = await awaitable
        except HttpError as e:
            resp = e.response()
        except Exception as e:
            log.error("handler failed", route=req.route, error=repr(e))
            resp = HttpError(500, "internal error", "internal").response()
        self.busy = False
        if self.closing:
            return
        self._send(req, resp)
        self._process()

    cdef _send(self, req, resp):
        srv = self.srv
        cdef bint keep = req.keep_alive and not srv.draining
        if keep:
            tail = b"\r\n\r\n" if req.version != "1.0" else b"\r\nconnection: keep-alive\r\n\r\n"
        else:
            tail = b"\r\nconnection: close\r\n\r\n"
        head = resp._head
        if head is None:
            head = resp.head()
        cdef bytes data = head + srv.date_line + b"x-request-id: " + req.request_id + tail
        if req.method != "HEAD":
            data += resp.body
        self.transport.write(data)
        metrics = self.metrics
        metrics.bytes_out += len(data)
        observe(metrics, req.route, resp.status, _perf() - req.started)
        if srv.access_log:
            log.info("access", method=req.method, path=req.path, status=resp.status, request_id=req.request_id,
                     ms=round((_perf() - req.started) * 1000, 3))
        if not keep:
            self.close()

    cdef _send_error(self, err):
        req = Request()
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
        return not self.pending and not self.busy and self.phase in (_IDLE_NEW, _IDLE_KEEPALIVE)

    def close(self):
        if not self.closing:
            self.closing = True
            self.transport.close()

    def abort(self, why):
        log.info("connection aborted", reason=why)
        self.closing = True
        self.transport.abort()


cpdef bytes next_request_id():
    global _rid_counter
    _rid_counter += 1
    return _RID_PREFIX + (b"%x" % _rid_counter)


cdef observe(metrics, str route, int status, double seconds):
    """WorkerMetrics.observe, inlined for the hot path (same data layout)."""
    cdef dict requests = metrics.requests, latency = metrics.latency
    key = (route, status)
    requests[key] = requests.get(key, 0) + 1
    h = latency.get(route)
    if h is None:
        h = latency[route] = [0] * (_NBUCKETS + 1) + [0.0]
    cdef Py_ssize_t i = 0
    while i < _NBUCKETS and seconds > <double>_BUCKETS[i]:
        i += 1
    h[i] += 1
    h[_NBUCKETS + 1] += seconds
