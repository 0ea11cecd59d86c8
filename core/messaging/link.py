"""A worker's ZeroMQ link to the supervisor: fire-and-forget sends and request/reply by id.

One DEALER socket per worker, driven straight from the event loop with add_reader on the ZMQ
file descriptor (core/messaging/zmqfd.py; zmq.asyncio costs measurable throughput on the HTTP path: ~10%
here).
Replies resolve the future waiting on their "id"; no answer by the deadline raises
TimeoutError, so a slow supervisor becomes a 503 for the client rather than a hung request.
"""
from __future__ import annotations

import asyncio
import itertools

import zmq

from tidegate.core.messaging import protocol
from tidegate.core.messaging.zmqfd import decoded


class SupervisorLink:
    def __init__(self, ctx: zmq.Context, endpoint: str, identity: str, max_message_bytes: int):
        self.ctx = ctx  # shared with the mesh: one ZeroMQ I/O thread per worker
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity.encode())
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self.loop = None
        self.on_command = None  # callback(msg) for unsolicited supervisor messages (protocol.PURGE)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.getsockopt(zmq.FD), self._on_readable)

    def _on_readable(self) -> None:
        for msg in decoded(self.sock, protocol.decode, protocol.ProtocolError):
            if msg["op"] != protocol.REPLY:
                if self.on_command is not None:
                    self.on_command(msg)
                continue
            fut = self._waiting.pop(msg.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def send(self, op: str, **fields) -> bool:
        try:
            self.sock.send(protocol.encode({"op": op, **fields}), zmq.NOBLOCK)
        except zmq.Again:
            return False  # supervisor backed up: a heartbeat can be skipped, the next carries the same news
        finally:
            self.loop.call_soon(self._on_readable)
        return True

    async def request(self, op: str, timeout: float = 2.0, **fields) -> dict:
        rid = next(self._ids)
        fut = self.loop.create_future()
        self._waiting[rid] = fut
        try:
            if not self.send(op, id=rid, **fields):
                raise asyncio.TimeoutError
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(rid, None)

    def close(self) -> None:
        if self.loop:
            self.loop.remove_reader(self.sock.getsockopt(zmq.FD))
        self.sock.close(0)
