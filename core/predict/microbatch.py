"""Micro-batching: concurrent submissions for one model become one batch.

submit(item) returns a future. The first item of a batch schedules a flush: at the end of the
current loop turn when the window is 0 (everything read in one epoll pass joins that batch, and
an idle gateway adds no wait), else after the window. A batch is cut at max_batch at once.

The window adapts to load, AIMD in the manner of Clipper: after a flush that came out at least
half full the window grows by an eighth of max_delay (batches are worth waiting for), after one
of one or two items it halves, and under 1/64 of max_delay it is 0 again. So a quiet gateway
never waits, and a saturated one waits at most max_delay to fill its batches (Triton's
max_queue_delay is the same bound).

run(items) returns a list of results (an Exception in place of an item's result fails just that
item) or an awaitable of one; an exception from run fails the whole batch.
"""
from __future__ import annotations

import asyncio


class MicroBatcher:
    def __init__(self, loop, run, max_batch: int, max_delay: float):
        self.loop, self.run, self.max_batch, self.max_delay = loop, run, max_batch, max_delay
        self.window = 0.0
        self.queue: list = []
        self.handle = None
        self.stats = {"batches": 0, "items": 0}

    def submit(self, item) -> asyncio.Future:
        fut = self.loop.create_future()
        self.queue.append((item, fut))
        if len(self.queue) >= self.max_batch:
            if self.handle is not None:
                self.handle.cancel()
            self.handle = self.loop.call_soon(self._flush)
        elif self.handle is None:
            self.handle = (self.loop.call_soon(self._flush) if self.window == 0
                           else self.loop.call_later(self.window, self._flush))
        return fut

    def _flush(self) -> None:
        self.handle = None
        batch, self.queue = self.queue[:self.max_batch], self.queue[self.max_batch:]
        if self.queue:
            self.handle = self.loop.call_soon(self._flush)
        if not batch:
            return
        self._adapt(len(batch))
        self.stats["batches"] += 1
        self.stats["items"] += len(batch)
        try:
            out = self.run([item for item, _ in batch])
        except Exception as e:
            _fail(batch, e)
            return
        if isinstance(out, list):
            _settle(batch, out)
        else:
            asyncio.ensure_future(out).add_done_callback(lambda t: _settle(batch, t.result()) if t.exception() is None
                                                         else _fail(batch, t.exception()))

    def _adapt(self, n: int) -> None:
        if n * 2 >= self.max_batch:
            self.window = min(self.max_delay, self.window + self.max_delay / 8)
        elif n <= 2:
            self.window /= 2
            if self.window < self.max_delay / 64:
                self.window = 0.0


def _settle(batch, results) -> None:
    for (_, fut), r in zip(batch, results):
        if fut.done():
            continue
        if isinstance(r, Exception):
            fut.set_exception(r)
        else:
            fut.set_result(r)


def _fail(batch, e: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(e)
