"""HTTP/1.1 serving: requests, responses, errors and the per-worker server state.

Layering follows tornado: the event loop drives `HttpConnection` (ext/httpconn.pyx: one per
socket, an asyncio Protocol compiled with Cython because it is the per-request hot path), which
frames requests with llhttp (httptools) and hands each complete `Request` to the delegate,
`HttpServer.dispatch`. Responses go out strictly in request order: while an async handler runs,
later pipelined requests wait.

Everything a client controls is bounded by `limits` (config): request-target and header bytes,
header count, body bytes, time to send headers and body, unanswered pipelined requests and the
write buffer. A violation answers with the OpenAI-shaped JSON error and closes the connection.
Time-outs are enforced by one sweep per second over the worker's connections instead of a timer
per request, which keeps the request path free of timer churn.
"""
from __future__ import annotations

import http
import time

import orjson

REASONS = {s.value: s.phrase for s in http.HTTPStatus}
STATUS_LINES = {code: f"HTTP/1.1 {code} {phrase}\r\n".encode() for code, phrase in REASONS.items()}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 408: "timeout_error",
               413: "invalid_request_error", 414: "invalid_request_error", 415: "invalid_request_error",
               417: "invalid_request_error",
               429: "rate_limit_error", 431: "invalid_request_error", 503: "service_unavailable_error"}

# connection phases, for the time-out sweep
IDLE_NEW, HEAD, BODY, BUSY, IDLE_KEEPALIVE = range(5)


class Response:
    __slots__ = ("status", "body", "content_type", "headers", "_head")

    def __init__(self, status: int = 200, body: bytes = b"", content_type: bytes = b"application/json",
                 headers: list[tuple[bytes, bytes]] | None = None):
        self.status, self.body, self.content_type, self.headers = status, body, content_type, headers
        self._head = None

    def head(self) -> bytes:
        """Status line and the headers that depend only on this response; built once, so a
        constant Response (e.g. /healthz) costs one concatenation per request."""
        if self._head is None:
            parts = [STATUS_LINES.get(self.status) or f"HTTP/1.1 {self.status} Unknown\r\n".encode(),
                     b"content-type: ", self.content_type, b"\r\ncontent-length: ", str(len(self.body)).encode(),
                     b"\r\n"]
            for name, value in self.headers or ():
                parts += (name, b": ", value, b"\r\n")
            self._head = b"".join(parts)
        return self._head


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
        self.conns: set = set()  # HttpConnection objects
        self.draining = False
        self.now = time.monotonic()
        self.date_line = b""       # "date: ...\r\nserver: tidegate\r\n", refreshed each second
        self.on_count_change = None         # callback(n_open) for accept pausing
        self.tick()

    def tick(self) -> None:
        """Once a second: refresh the clock and Date header, enforce time-outs."""
        self.now = now = time.monotonic()
        self.date_line = time.strftime("date: %a, %d %b %Y %H:%M:%S GMT\r\nserver: tidegate\r\n",
                                       time.gmtime()).encode()
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

    def drain(self) -> None:
        """Stop keeping connections alive: idle ones close now, busy ones after their answer."""
        self.draining = True
        for conn in list(self.conns):
            if conn.is_idle():
                conn.close()
