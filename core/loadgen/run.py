"""The open-loop run: arrivals at the scenario's rate whatever the answers do (so a slow server
cannot hide its latency by slowing the client down: coordinated omission), each request timed
from its scheduled send time, over a pool of keep-alive connections (httptools parses answers).

Each answer is sorted into: ok (2xx), cached (2xx marked x-tidegate-shed: a cached
approximation), rejected (503 marked x-tidegate-shed, with Retry-After), error (any other status
or a broken connection) and timeout (no answer within the scenario's timeout). Latencies go into
HDR histograms per class and second (core/loadgen/report.py).
"""
from __future__ import annotations

import asyncio
import gc
import random
import sys
import time
from collections import deque

import httptools
import orjson

from tidegate.core.loadgen.report import Recorder
from tidegate.core.loadgen.scenario import Scenario


class _Answer:
    def __init__(self):
        self.status, self.headers, self.body, self.done, self.keep = 0, {}, [], False, True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


class Conn:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    async def send(self, head: bytes, body: bytes) -> _Answer:
        self.writer.write(head + body)
        ans = _Answer()
        parser = httptools.HttpResponseParser(ans)
        while not ans.done:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("connection closed mid-answer")
            parser.feed_data(data)
        ans.status = parser.get_status_code()
        ans.keep = parser.should_keep_alive()
        return ans

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Keep-alive connections, at most `limit` open; a request beyond waits for one (its wait
    counts in its latency: it was due at its scheduled time)."""

    def __init__(self, host: str, port: int, limit: int):
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[Conn] = []
        self.open = 0
        self.waiters: deque = deque()

    async def get(self) -> Conn:
        if self.idle:
            return self.idle.pop()
        if self.open >= self.limit:
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            conn = await fut
            if conn is not None:
                return conn
        self.open += 1
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            self.open -= 1
            raise
        return Conn(reader, writer)

    def put(self, conn: Conn, reusable: bool) -> None:
        if not reusable:
            conn.close()
            self.open -= 1
            conn = None
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                if conn is None:
                    fut.set_result(None)  # it may open a new one: one just closed
                else:
                    fut.set_result(conn)
                return
        if conn is not None:
            self.idle.append(conn)


async def _sessions(sc: Scenario, pool: Pool, stream) -> list[str]:
    tokens = []
    for i in range(stream.sessions):
        body = orjson.dumps({"user": f"{stream.name}-user-{i}"})
        head = _head(sc, "POST", "/v1/sessions", {**stream.headers, "Content-Type": "application/json"}, body)
        conn = await pool.get()
        ans = await conn.send(head, body)
        pool.put(conn, ans.keep)
        if ans.status != 201:
            raise RuntimeError(f"stream {stream.name}: POST /v1/sessions answered {ans.status}: {b''.join(ans.body)[:200]}")
        tokens.append(orjson.loads(b"".join(ans.body))["token"])
    return tokens


def _head(sc: Scenario, method: str, path: str, headers: dict, body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {sc.host}:{sc.port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def run(sc: Scenario, progress: bool = True, seed: int = 1, watch=None) -> Recorder:
    """Drive every stream for the scenario's duration; returns the recorder (see report.py).
    watch(): a sample of the server's memory (bytes) taken every second, when given."""
    rng = random.Random(seed)
    pool = Pool(sc.host, sc.port, sc.connections)
    rec = Recorder(sc)
    tokens = {id(s): await _sessions(sc, pool, s) for s in sc.streams if s.sessions}
    gc.collect()
    gc.freeze()  # the instrument's own pauses would read as server latency
    clock = time.perf_counter  # not loop.time(): uvloop's clock ticks in whole milliseconds
    start = clock()
    tasks: set = set()

    async def fire(s, due: float) -> None:
        headers = dict(s.headers)
        if id(s) in tokens:
            headers["Authorization"] = f"Bearer {rng.choice(tokens[id(s)])}"
        body = s.body(rng)
        head = _head(sc, s.method, s.path, headers, body)
        conn = None
        try:
            conn = await asyncio.wait_for(pool.get(), sc.timeout)
            ans = await asyncio.wait_for(conn.send(head, body), max(0.001, sc.timeout - (clock() - due)))
        except asyncio.TimeoutError:
            if conn is not None:
                pool.put(conn, False)
            rec.record(s, due - start, clock() - due, "timeout")
            return
        except (OSError, ConnectionError, httptools.HttpParserError):
            if conn is not None:
                pool.put(conn, False)
            rec.record(s, due - start, clock() - due, "error")
            return
        pool.put(conn, ans.keep)
        shed = "x-tidegate-shed" in ans.headers
        kind = ("cached" if shed else "ok") if 200 <= ans.status < 300 else (
            "rejected" if ans.status == 503 and shed else "error")
        rec.record(s, due - start, clock() - due, kind, ans.headers.get("x-tidegate-cache"))

    async def drive(s) -> None:
        # a random phase per stream: constant rates that divide each other (1/s and 10/s) would
        # otherwise send every request of the slower stream at the same instant as one of the other
        t = rng.random() / s.rate if s.rate > 0 else 0.0
        while True:
            rate = s.rate * (sc.multiplier(t) if s.follows else 1.0)
            if rate <= 0:
                t += 0.01
            else:
                t += 1.0 / rate
            if t >= sc.duration:
                return
            delay = start + t - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(fire(s, start + t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def ticker() -> None:
        second = 0
        while clock() - start < sc.duration:
            second += 1
            await asyncio.sleep(max(0.0, start + second - clock()))
            if watch is not None:
                rec.memory(second, watch())
            if progress:
                print(rec.progress_line(second - 1, sc.multiplier(second - 1), pool), file=sys.stderr, flush=True)

    await asyncio.gather(ticker(), *(drive(s) for s in sc.streams))
    if tasks:
        await asyncio.wait(tasks, timeout=sc.timeout + 1)
    for c in pool.idle:
        c.close()
    rec.wall = time.time()
    return rec
