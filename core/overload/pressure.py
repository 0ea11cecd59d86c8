"""Backpressure: downstream processes say how loaded each traffic class is; ingress sheds at the door.

A downstream (an inference worker) feeds `ClassMonitor` its queues each loop turn: the age of the
oldest queued request per class (its sojourn so far) and how many finished. CoDel's rule decides
overload: a class is overloaded once its queueing delay has stayed above `target` for a whole
`interval` (5 ms / 100 ms, as in folly and Envoy), and stops being so as soon as it drops below.
Shedding travels upstream DAGOR-style: an overloaded class sheds every class below it, and
itself unless it is the highest (critical is never shed for its own queue: its reservation
holds). `Publisher` sends the state over a ZeroMQ PUB socket every few ms while anything is
queued (and every 0.5 s otherwise); each ingress worker's `PressureView` keeps the latest
message per downstream and ignores one older than a second (a hung downstream is the breakers'
business, not a reason to shed forever).
"""
from __future__ import annotations

import math
import time

import orjson
import zmq

from tidegate.core.base.config import CLASSES
from tidegate.ext.ringbuf import Window

STALE_S, IDLE_PUBLISH_S = 1.0, 0.5


class ClassMonitor:
    def __init__(self, target: float = 0.005, interval: float = 0.1):
        self.target, self.interval = target, interval
        self.above_since = {c: None for c in CLASSES}
        self.overloaded = {c: False for c in CLASSES}
        self.delay = {c: 0.0 for c in CLASSES}
        self.depth = {c: 0 for c in CLASSES}
        self.done = {c: Window(64) for c in CLASSES}  # finish times: the drain rate for Retry-After

    def observe(self, now: float, oldest: dict, depth: dict) -> None:
        """oldest: class -> enqueue time of its oldest queued request (None when empty)."""
        for c in CLASSES:
            t = oldest.get(c)
            self.depth[c] = depth.get(c, 0)
            self.delay[c] = delay = now - t if t is not None else 0.0
            if delay < self.target:
                self.above_since[c], self.overloaded[c] = None, False
            elif self.above_since[c] is None:
                self.above_since[c] = now
            elif now - self.above_since[c] >= self.interval:
                self.overloaded[c] = True

    def finished(self, cls: str, now: float) -> None:
        self.done[cls].push(now)

    def shed(self) -> list[str]:
        """Classes to shed at the door: below the highest overloaded class, and that class itself
        unless it is critical."""
        for i, c in enumerate(CLASSES):
            if self.overloaded[c]:
                return list(CLASSES[max(i, 1):])
        return []

    def retry_after(self, cls: str, now: float) -> int:
        """Seconds until the class's queue would drain at its recent finishing rate (1..30)."""
        w = self.done[cls]
        span = now - w.minimum() if len(w) > 1 else 0.0
        rate = (len(w) - 1) / span if span > 0 else 0.0
        return max(1, min(30, math.ceil(self.depth[cls] / rate))) if rate > 0 else (1 if not self.depth[cls] else 30)

    def state(self, now: float) -> dict:
        return {"shed": self.shed(), "classes": {c: {"depth": self.depth[c], "delay": round(self.delay[c], 6),
                                                     "overloaded": self.overloaded[c],
                                                     "retry_after": self.retry_after(c, now)} for c in CLASSES}}


class LoopLag:
    """The ingress worker's own pressure: how late its event loop runs a timer set every `every`
    seconds (the sojourn of work in its ready queue, plus time it waited for a CPU). Every class's
    latency goes through this loop, so once more than `share` of the last second's samples were
    late by over `target`, background is shed at the door until the share halves: it is the
    cheapest work to turn away and the first whose load (its streams, its model calls) frees
    the CPU for the rest."""

    def __init__(self, loop, target: float, share: float, every: float = 0.005):
        self.loop, self.target, self.share, self.every = loop, target, share, every
        self.samples = Window(max(10, int(round(1.0 / every))))
        self.overloaded = False
        self.handle = loop.call_later(every, self._tick, time.perf_counter() + every)

    def _tick(self, due: float) -> None:
        now = time.perf_counter()
        self.samples.push(now - due)
        late = self.samples.share_at_least(self.target)
        self.overloaded = late > (self.share / 2 if self.overloaded else self.share)
        self.handle = self.loop.call_later(self.every, self._tick, now + self.every)

    def close(self) -> None:
        self.handle.cancel()


class Publisher:
    def __init__(self, ctx: zmq.Context, endpoint: str, source: str, interval: float):
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100)
        self.sock.bind(endpoint)
        self.source, self.interval, self.last = source, interval, 0.0
        self.last_shed: list = []

    def maybe_publish(self, monitor: ClassMonitor, now: float) -> None:
        """Every interval while busy (IDLE_PUBLISH_S while idle), and at once when the classes to
        shed change: the end of an overload reached the doors up to half a second late, and the
        next request on an idle model was shed on that stale word."""
        busy = any(monitor.depth.values())
        shed = monitor.shed()
        if shed == self.last_shed and now - self.last < (self.interval if busy else IDLE_PUBLISH_S):
            return
        self.last, self.last_shed = now, shed
        msg = dict(monitor.state(now), src=self.source, t=time.time())
        try:
            self.sock.send(orjson.dumps(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # nobody listening yet, or a slow subscriber: the next one will do

    def close(self) -> None:
        self.sock.close(0)


class PressureView:
    """Ingress side: the latest pressure of every downstream it subscribes to."""

    def __init__(self, ctx: zmq.Context, loop, endpoints: dict):
        self.latest: dict[str, dict] = {}
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        for ep in endpoints.values():
            self.sock.connect(ep)
        self.loop = loop
        loop.add_reader(self.sock.getsockopt(zmq.FD), self._on_readable)
        loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            try:
                msg = orjson.loads(frame)
                self.latest[msg["src"]] = msg
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue

    def shedding(self, source: str, cls: str) -> int | None:
        """Retry-After seconds when source asks to shed cls now, else None."""
        msg = self.latest.get(source)
        if msg is None or cls not in msg["shed"] or time.time() - msg["t"] > STALE_S:
            return None
        return msg["classes"][cls]["retry_after"]

    def close(self) -> None:
        self.loop.remove_reader(self.sock.getsockopt(zmq.FD))
        self.sock.close(0)
