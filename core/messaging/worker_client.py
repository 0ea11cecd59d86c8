"""An ingress worker's link to a blocking worker (an inference worker, the embedder): submit,
cancel, and events routed back to the request that asked.

One DEALER per (ingress worker, model), driven from the event loop with add_reader. Requests
queued in one loop turn leave in one frame. A socket monitor tells whether the inference worker
is connected. Before it first connects (the daemon is starting) ZeroMQ queues requests until it
does; once it has been connected, a lost connection (crash, respawn) fails the requests in
flight and answers new ones 503 with Retry-After at once instead of letting them hang.
"""
from __future__ import annotations

import itertools

import zmq
from zmq.utils.monitor import recv_monitor_message

from tidegate.core.base.jsonlog import log
from tidegate.core.messaging.protocol import CANCEL, CREDIT, DELTA, ERR, failure, pack
from tidegate.core.messaging.zmqfd import decoded


class WorkerUnavailable(Exception):
    """The blocking worker is down (crashed, restarting): answered 503 at once, never queued."""


class WorkerClient:
    def __init__(self, ctx: zmq.Context, endpoint: str, loop, max_message_bytes: int):
        self.loop = loop
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.max_frame = max_message_bytes
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 10000)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 50)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self.connected = self.was_connected = False
        self.handlers: dict[int, object] = {}  # rid -> callback(kind, payload)
        self._ids = itertools.count(1)
        self._outbox: list = []
        loop.add_reader(self.sock.getsockopt(zmq.FD), self._on_readable)
        loop.add_reader(self.monitor.getsockopt(zmq.FD), self._on_monitor)
        loop.call_soon(self._on_monitor)

    def submit(self, op: str, body, handler) -> int:
        """Send a request; handler(kind, payload) gets its events. Raises WorkerUnavailable."""
        if self.was_connected and not self.connected:
            raise WorkerUnavailable("the inference worker is not running (starting or restarting)")
        rid = next(self._ids)
        self.handlers[rid] = handler
        self._queue([op, rid, body])
        return rid

    def send(self, op: str, body) -> None:
        """A message that expects no answer (a cache insert); dropped while disconnected."""
        if self.connected or not self.was_connected:
            self._queue([op, 0, body])

    def cancel(self, rid: int) -> None:
        if self.handlers.pop(rid, None) is not None and self.connected:
            self._queue([CANCEL, rid, None])

    def credit(self, rid: int, n: int) -> None:
        """A stream's reader took n more deltas: its sequence may run n further ahead."""
        if rid in self.handlers and self.connected:
            self._queue([CREDIT, rid, n])

    def _queue(self, msg: list) -> None:
        if not self._outbox:
            self.loop.call_soon(self._flush)
        self._outbox.append(msg)

    def _flush(self) -> None:
        msgs, self._outbox = self._outbox, []
        if self.sock.closed:
            return
        frames, too_big = pack(msgs, self.max_frame)
        for m in too_big:
            handler = self.handlers.pop(m[1], None)
            if handler is not None:
                handler(ERR, failure(413, f"request larger than server.max_frame_bytes ({self.max_frame})",
                              "request_too_large"))
        try:
            for frame in frames:
                self.sock.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError:
            self._fail([m[1] for m in msgs if m[1]], "the worker is not accepting requests")
        self.loop.call_soon(self._on_readable)  # a send can eat the fd's edge

    def _on_readable(self) -> None:
        for events in decoded(self.sock):
            for kind, rid, payload in events:
                handler = self.handlers.get(rid)
                if handler is None:
                    continue  # cancelled meanwhile
                if kind != DELTA:
                    del self.handlers[rid]
                try:
                    handler(kind, payload)
                except Exception as e:  # one request's bug must not drop the other events of the frame
                    self.handlers.pop(rid, None)
                    log.error("event handler failed", kind=kind, error=repr(e))

    def _on_monitor(self) -> None:
        while not self.monitor.closed:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_CONNECTED:
                self.connected = self.was_connected = True
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self._fail(list(self.handlers), "the inference worker went away; retry shortly")

    def _fail(self, rids, why: str) -> None:
        for rid in rids:
            handler = self.handlers.pop(rid, None)
            if handler is not None:
                handler(ERR, failure(503, why, "worker_unavailable"))

    def close(self) -> None:
        self.loop.remove_reader(self.sock.getsockopt(zmq.FD))
        self.loop.remove_reader(self.monitor.getsockopt(zmq.FD))
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
