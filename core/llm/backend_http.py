"""A small HTTP/1.1 client for the generation path to remote backends: keep-alive connections
per backend, requests written whole, responses parsed by httptools (as the ingress parses
requests), a body read chunk by chunk as it arrives. aiohttp had been half of the proxy path's
CPU (a task and a trace per request, its stream readers); health checks and embeddings still use
it.

What a caller learns is exactly what failover needs: `Unsent` (the connection could not be
made: nothing went out), `Lost` (the request was written, then the connection closed or broke
before a response head: the backend may have it), `Cut` (the body stopped before its end).
Bytes that arrived before a cut are handed out first (`Response.chunk`)."""
from __future__ import annotations

import asyncio
import ssl as _ssl
from collections import deque
from urllib.parse import urlsplit

import httptools


class Unsent(Exception):
    """The connection failed before any of the request was written."""


class Lost(Exception):
    """The request was written; the connection closed or failed before a response head."""


class Cut(Exception):
    """The response body stopped before its end."""


class Response:
    __slots__ = ("status", "headers", "_conn", "_chunks", "_done", "_error", "_waiter")

    def __init__(self, conn: "_Conn"):
        self.status, self.headers, self._conn = 0, {}, conn
        self._chunks: deque = deque()
        self._done, self._error, self._waiter = False, None, None

    async def chunk(self) -> bytes:
        """The next piece of the body; b"" at its end. Raises Cut once what arrived is read."""
        while not self._chunks:
            if self._done:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._chunks.popleft()

    async def read(self, limit: int = 1 << 20) -> bytes:
        """The whole body (at most limit bytes of it)."""
        out, n = [], 0
        while n < limit:
            c = await self.chunk()
            if not c:
                break
            out.append(c)
            n += len(c)
        return b"".join(out)[:limit]

    def release(self) -> None:
        """Done with it: the connection goes back to its pool if the body ended cleanly and both
        sides keep it alive, else it is closed (a body left unread included)."""
        conn, self._conn.response = self._conn, None
        if self._done and not self._chunks and conn.keep_alive and not conn.closed:
            conn.pool.put(conn)
        else:
            conn.close()

    # called by the connection
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Conn(asyncio.Protocol):
    def __init__(self, pool: "Pool"):
        self.pool, self.loop = pool, pool.loop
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.head: asyncio.Future | None = None
        self.closed, self.keep_alive, self.idle_since = False, True, 0.0
        self._name = b""

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes on an idle connection: nothing asked for them
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Cut("the backend switched protocols"))
        except httptools.HttpParserError as e:
            self._fail(Cut(f"the backend's response did not parse ({e})") if self.head is None or self.head.done()
                       else Lost(f"the backend's response did not parse ({e})"))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool.forget(self)
        self._fail((Lost if self.head is not None and not self.head.done() else Cut)(
            f"the backend closed the connection{f' ({exc!r})' if exc else ''}"))

    # httptools callbacks
    def on_status(self, status: bytes) -> None:
        self.response.status = self.parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.response.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if self.head is not None and not self.head.done():
            self.head.set_result(self.response)

    def on_body(self, body: bytes) -> None:
        r = self.response
        if r is not None:
            r._chunks.append(body)
            r._wake()

    def on_message_complete(self) -> None:
        r = self.response
        if r is not None:
            r._done = True
            r._wake()

    # ours
    def _fail(self, err: Exception) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(err if isinstance(err, Lost) else Lost(str(err)))
        r = self.response
        if r is not None and not r._done:
            r._error = err if isinstance(err, Cut) else Cut(str(err))
            r._wake()
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()


class Pool:
    """Keep-alive connections to one backend origin; idle ones are reused while younger than
    keepalive seconds (below the backends' own idle timeouts, so a reused one is not one the
    backend is closing)."""

    def __init__(self, url: str, loop, keepalive: float, connect_timeout: float, max_idle: int = 256):
        u = urlsplit(url)
        self.host, self.https = u.hostname or "127.0.0.1", u.scheme == "https"
        self.port = u.port or (443 if self.https else 80)
        self.base = u.path.rstrip("/")
        self.loop, self.keepalive, self.connect_timeout, self.max_idle = loop, keepalive, connect_timeout, max_idle
        self.idle: deque[_Conn] = deque()
        self.open: set[_Conn] = set()
        host = self.host if ":" not in self.host else f"[{self.host}]"
        self.host_header = (host if u.port is None else f"{host}:{self.port}").encode()
        self._ssl = _ssl.create_default_context() if self.https else None

    def put(self, conn: _Conn) -> None:
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        while len(self.idle) > self.max_idle:
            self.idle.popleft().close()

    def forget(self, conn: _Conn) -> None:
        self.open.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    async def _conn(self) -> _Conn:
        now = self.loop.time()
        while self.idle:
            c = self.idle.pop()  # the most recently used: the least likely to be closing
            if not c.closed and now - c.idle_since < self.keepalive:
                return c
            c.close()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, c = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port, ssl=self._ssl,
                                                         server_hostname=self.host if self.https else None)
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.TimeoutError, _ssl.SSLError) as e:
            raise Unsent(f"could not connect to {self.host}:{self.port} ({e!r})") from None
        self.open.add(c)
        return c

    async def post(self, path: str, body: bytes, headers: dict) -> Response:
        """Write the request and wait for the response head (the caller bounds the wait)."""
        c = await self._conn()
        c.response, c.head = Response(c), self.loop.create_future()
        c.parser = httptools.HttpResponseParser(c)
        head = [b"POST ", (self.base + path).encode(), b" HTTP/1.1\r\nHost: ", self.host_header,
                b"\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: ",
                str(len(body)).encode(), b"\r\n"]
        for k, v in headers.items():
            head += [k.encode(), b": ", v.encode(), b"\r\n"]
        head.append(b"\r\n")
        c.transport.write(b"".join(head) + body)
        try:
            return await c.head
        except BaseException:
            c.close()
            raise

    def close(self) -> None:
        for c in list(self.open):
            c.close()
