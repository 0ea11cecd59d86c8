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

# the request/response types live with the connection in the compiled hot path
from tidegate.ext.httpconn import (BODY, ERROR_TYPES, HEAD, IDLE_KEEPALIVE, IDLE_NEW, HttpError,  # noqa: F401
                                   HttpServer, Request, Response, Stream, Upgrade, json_response)


def service_unavailable(message: str, code: str, retry_after: int = 1, param: str | None = None) -> HttpError:
    """A 503 that says when to come back: every refusal for a part that is down or full."""
    return HttpError(503, message, code, param=param, headers=[(b"retry-after", str(retry_after).encode())])
