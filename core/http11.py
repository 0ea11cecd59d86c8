"""HTTP/1.1 connections: framing, limits, keep-alive and pipelining over an asyncio transport.

Layering follows tornado: the event loop drives `HttpConnection` (one per socket, an asyncio
Protocol), which frames requests with llhttp (httptools) and hands each complete `Request` to
the delegate, `HttpServer.dispatch`. Responses go out strictly in request order: while an async
handler runs, later pipelined requests wait in `pending`.

Everything a client controls is bounded by `limits` (config): request-target and header bytes,
header count, body bytes, time to send headers and body, unanswered pipelined requests and the
write buffer. A violation answers with the OpenAI-shaped JSON error and closes the connection.
Time-outs are enforced by one sweep per second over the worker's connections instead of a timer
per request, which keeps the request path free of timer churn.
"""
from __future__ import annotations

import asyncio
import http
import os
import time
from collections import deque

import httptools
import orjson

from tidegate.core.jsonlog import log

REASONS = {s.value: s.phrase for s in http.HTTPStatus}
STATUS_LINES = {code: f"HTTP/1.1 {code} {phrase}\r\n".encode() for code, phrase in REASONS.items()}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 408: "timeout_error",
               413: "invalid_request_error", 414: "invalid_request_error", 415: "invalid_request_error",
               417: "invalid_request_error",
               429: "rate_limit_error", 431: "invalid_request_error", 503: "service_unavailable_error"}

# connection phases, for the time-out sweep
IDLE_NEW, HEAD, BODY, BUSY, IDLE_KEEPALIVE = range(5)
_READ_SLACK = 256 * 1024  # one event-loop read may carry earlier pipelined requests too
_RID_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


class Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int = 200, body: bytes = b"", content_type: bytes = b"application/json",
                 headers: list[tuple[bytes, bytes]] | None = None):
        self.status, self.body, self.content_type, self.headers = status, body, content_type, headers


def json_response(obj, status: int = 200, headers=None) -> Response:
    return Response(status, orjson.dumps(obj), b"application/json", headers)


class HttpError(Exception):
    """Raised anywhere in request handling; becomes an OpenAI-shaped JSON error response."""

    def __init__(self, status: int, message: str, code: str | None = None, headers=None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.close = status, message, code, headers, close

    def response(self) -> Response:
        body = {"error": {"type": ERROR_TYPES.get(self.status, "server_error"), "message": self.message,
                          "param": None, "code": self.code}}
        return Response(self.status, orjson.dumps(body), b"application/json", self.headers)


class Request:
    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive", "version", "request_id",
                 "started", "route")

    def header(self, name: bytes, default: bytes | None = None) -> bytes | None:
        return self.headers.get(name, default)


class _Failure:
    """A framing error queued behind the requests parsed before it, so answers stay in order."""
    __slots__ = ("error",)

    def __init__(self, error: HttpError):
        self.error = error


class HttpServer:
    """Per-worker state the connections share: limits, the delegate, metrics, the coarse clock."""

    def __init__(self, limits: dict, dispatch, metrics, access_log: bool = False):
        self.limits = limits
        self.dispatch = dispatch            # Request -> Response | awaitable[Response]; sets req.route
        self.metrics = metrics
        self.access_log = access_log
        self.conns: set[HttpConnection] = set()
        self.draining = False
        self.now = time.monotonic()
        self.date = b""
        self._rid_prefix = os.urandom(6).hex()
        self._rid_counter = 0
        self.on_count_change = None         # callback(n_open) for accept pausing
        self.tick()

    def tick(self) -> None:
        """Once a second: refresh the clock and Date header, enforce time-outs."""
        self.now = now = time.monotonic()
        self.date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()).encode()
        lim = self.limits
        head_t, body_t, ka_t, send_t = (lim["header_timeout"], lim["body_timeout"], lim["keepalive_timeout"],
                                        lim["send_timeout"])
        for conn in list(self.conns):
            phase, idle = conn.phase, now - conn.since
            if conn.paused_since and now - conn.paused_since > send_t:
                conn.abort("send timeout: client is not reading")
            elif conn.busy or conn.pending:
                continue
            elif phase in (IDLE_NEW, HEAD) and idle > head_t:
                conn.fail_now(HttpError(408, f"request header not received within {head_t:g} s",
                                        "header_timeout"))
            elif phase == BODY and idle > body_t:
                conn.fail_now(HttpError(408, f"request body stalled for more than {body_t:g} s", "body_timeout"))
            elif phase == IDLE_KEEPALIVE and idle > ka_t:
                conn.close()

    def next_request_id(self) -> bytes:
        self._rid_counter += 1
        return f"{self._rid_prefix}-{self._rid_counter:x}".encode()

    def drain(self) -> None:
        """Stop keeping connections alive: idle ones close now, busy ones after their answer."""
        self.draining = True
        for conn in list(self.conns):
            if conn.is_idle():
                conn.close()


class HttpConnection(asyncio.Protocol):
    __slots__ = ("srv", "transport", "parser", "phase", "since", "pending", "busy", "closing", "paused_since",
                 "read_paused", "_url", "_headers", "_nheaders", "_hbytes", "_body", "_blen", "_started",
                 "_in_message", "_raw_head")

    def __init__(self, srv: HttpServer):
        self.srv = srv
        self.transport = None
        self.parser = None
        self.pending: deque = deque()
        self.busy = False          # an async handler is running for the head of the queue
        self.closing = False
        self.paused_since = 0.0    # when the transport asked us to stop writing (slow reader)
        self.read_paused = False
        self._in_message = False
        self._raw_head = 0

    # ---- transport events -------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        srv = self.srv
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.phase, self.since = IDLE_NEW, srv.now
        transport.set_write_buffer_limits(high=srv.limits["write_buffer_bytes"])
        srv.conns.add(self)
        srv.metrics.connections_accepted += 1
        if srv.on_count_change:
            srv.on_count_change(len(srv.conns))

    def connection_lost(self, exc) -> None:
        self.closing = True
        srv = self.srv
        srv.conns.discard(self)
        self.pending.clear()
        if srv.on_count_change:
            srv.on_count_change(len(srv.conns))

    def data_received(self, data: bytes) -> None:
        if self.closing or self.parser is None:
            return
        self.srv.metrics.bytes_in += len(data)
        try:
            self.parser.feed_data(data)
        except HttpError as e:
            self._fail(e)
        except httptools.HttpParserUpgrade:
            # Upgrades (WebSocket) are not served yet: answer the request, then close.
            if self.pending:
                self.pending[-1].keep_alive = False
            self._stop_reading()
        except httptools.HttpParserError as e:
            # an HttpError raised in one of our callbacks comes back wrapped as its __context__
            cause = e.__context__
            self._fail(cause if isinstance(cause, HttpError) else
                       HttpError(400, f"malformed HTTP request: {e}", "bad_framing"))
        else:
            if self.phase == HEAD:
                # llhttp buffers a header line until it ends: bound what an unfinished head may hold
                self._raw_head += len(data)
                lim = self.srv.limits
                if self._raw_head > lim["max_header_bytes"] + lim["max_request_line"] + _READ_SLACK:
                    self._fail(HttpError(431, "request header section too large", "header_too_large"))
        if not self.busy:
            self._process()

    def pause_writing(self) -> None:
        self.paused_since = self.srv.now or 1.0

    def resume_writing(self) -> None:
        self.paused_since = 0.0
        if not self.busy:
            self._process()

    # ---- llhttp callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_message = True
        self.phase, self.since = HEAD, self.srv.now
        self._raw_head = 0
        self._url = b""
        self._headers = {}
        self._nheaders = 0
        self._hbytes = 0
        self._body = None
        self._blen = 0
        self._started = time.perf_counter()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.srv.limits["max_request_line"]:
            raise HttpError(414, f"request target longer than {self.srv.limits['max_request_line']} bytes",
                            "uri_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        lim = self.srv.limits
        self._nheaders += 1
        self._hbytes += len(name) + len(value) + 4
        if self._nheaders > lim["max_headers"]:
            raise HttpError(431, f"more than {lim['max_headers']} header fields", "too_many_headers")
        if self._hbytes > lim["max_header_bytes"]:
            raise HttpError(431, f"header section larger than {lim['max_header_bytes']} bytes", "header_too_large")
        name = name.lower()
        if name == b"transfer-encoding" and value.strip().lower() != b"chunked":
            # llhttp accepts codings like "gzip, chunked"; we decode none of them
            raise HttpError(400, "unsupported Transfer-Encoding: only 'chunked' is accepted", "bad_framing")
        if name in self._headers:
            if name == b"host":
                raise HttpError(400, "duplicate Host header", "bad_framing")
            self._headers[name] += b", " + value
        else:
            self._headers[name] = value

    def on_headers_complete(self) -> None:
        self.phase, self.since = BODY, self.srv.now
        headers, lim = self._headers, self.srv.limits
        if self.parser.get_http_version() == "1.1" and b"host" not in headers:
            raise HttpError(400, "missing Host header", "bad_framing")
        cl = headers.get(b"content-length")
        if cl is not None and int(cl) > lim["max_body_bytes"]:
            raise HttpError(413, f"request body larger than {lim['max_body_bytes']} bytes", "body_too_large")
        expect = headers.get(b"expect")
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise HttpError(417, "only 'Expect: 100-continue' is supported", "bad_expect")
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.since = self.srv.now
        self._blen += len(body)
        if self._blen > self.srv.limits["max_body_bytes"]:
            raise HttpError(413, f"request body larger than {self.srv.limits['max_body_bytes']} bytes",
                            "body_too_large")
        if self._body is None:
            self._body = [body]
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self.phase = BUSY
        parser = self.parser
        req = Request()
        req.method = parser.get_method().decode()
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
        req.request_id = rid if rid and len(rid) <= 128 and _RID_OK.issuperset(rid) else self.srv.next_request_id()
        req.started = self._started
        req.route = "unmatched"
        self.pending.append(req)
        if len(self.pending) >= self.srv.limits["max_pipelined"]:
            self._stop_reading()

    # ---- answering --------------------------------------------------------------------------
    def _process(self) -> None:
        """Answer queued requests in order until one needs to wait."""
        pending = self.pending
        while pending and not self.busy and not self.closing and not self.paused_since:
            req = pending.popleft()
            if req.__class__ is _Failure:
                return self._send_error(req.error, None)
            try:
                resp = self.srv.dispatch(req)
            except HttpError as e:
                resp = e.response()
            except Exception as e:  # a handler bug must not take the worker down
                log.error("handler failed", route=req.route, error=repr(e))
                resp = HttpError(500, "internal error", "internal").response()
            if resp.__class__ is not Response:
                self.busy = True
                asyncio.ensure_future(self._await(req, resp))
                return
            self._send(req, resp)
        if self.read_paused and not self.closing and len(pending) < self.srv.limits["max_pipelined"]:
            self.read_paused = False
            self.transport.resume_reading()
        if not pending and not self._in_message and not self.busy:
            self.phase, self.since = IDLE_KEEPALIVE, self.srv.now

    async def _await(self, req: Request, awaitable) -> None:
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

    def _send(self, req: Request, resp: Response) -> None:
        srv = self.srv
        keep = req.keep_alive and not srv.draining
        body = resp.body
        parts = [STATUS_LINES.get(resp.status) or f"HTTP/1.1 {resp.status} Unknown\r\n".encode(),
                 b"date: ", srv.date, b"\r\nserver: tidegate\r\ncontent-type: ", resp.content_type,
                 b"\r\ncontent-length: ", str(len(body)).encode(), b"\r\nx-request-id: ", req.request_id]
        if resp.headers:
            for name, value in resp.headers:
                parts += (b"\r\n", name, b": ", value)
        if not keep:
            parts.append(b"\r\nconnection: close")
        elif req.version == "1.0":
            parts.append(b"\r\nconnection: keep-alive")
        parts.append(b"\r\n\r\n")
        if req.method != "HEAD":
            parts.append(body)
        data = b"".join(parts)
        self.transport.write(data)
        srv.metrics.bytes_out += len(data)
        srv.metrics.observe(req.route, resp.status, time.perf_counter() - req.started)
        if srv.access_log:
            log.info("access", method=req.method, path=req.path, status=resp.status, request_id=req.request_id,
                     ms=round((time.perf_counter() - req.started) * 1000, 3))
        if not keep:
            self.close()

    def _send_error(self, err: HttpError, started: float | None) -> None:
        req = Request()
        req.method, req.version, req.keep_alive, req.route = "GET", "1.1", False, "-"
        req.request_id = self.srv.next_request_id()
        req.started = started or time.perf_counter()
        self._send(req, err.response())

    def _fail(self, err: HttpError) -> None:
        """A framing or limit error: answer it after what was parsed before it, then close."""
        self._stop_reading()
        self.parser = None
        self.pending.append(_Failure(err))

    def fail_now(self, err: HttpError) -> None:
        self._fail(err)
        self._process()

    def _stop_reading(self) -> None:
        if not self.read_paused and not self.closing:
            self.read_paused = True
            self.transport.pause_reading()

    def is_idle(self) -> bool:
        return not self.pending and not self.busy and self.phase in (IDLE_NEW, IDLE_KEEPALIVE)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.transport.close()

    def abort(self, why: str) -> None:
        log.info("connection aborted", reason=why)
        self.closing = True
        self.transport.abort()
