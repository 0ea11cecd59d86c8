"""A worker's ZeroMQ link to the supervisor: fire-and-forget sends and request/reply by id.

One DEALER socket per worker. Replies come back in any order and resolve the future that waits
on their "id"; a request that gets no answer by its deadline raises TimeoutError, so a slow
supervisor turns into a 503 for the client instead of a hung request.
"""
from __future__ import annotations

import asyncio
import itertools

import zmq
import zmq.asyncio

from tidegate.core import protocol


class SupervisorLink:
    def __init__(self, endpoint: str, identity: str, max_message_bytes: int):
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity.encode())
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader = None

    def start(self) -> None:
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            try:
                frame = await self.sock.recv()
                msg = protocol.decode(frame)
            except protocol.ProtocolError:
                continue
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            fut = self._waiting.pop(msg.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def send(self, op: str, **fields) -> None:
        try:
            self.sock.send(protocol.encode({"op": op, **fields}), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # supervisor backed up: a heartbeat can be skipped, the next one carries the same news

    async def request(self, op: str, timeout: float = 2.0, **fields) -> dict:
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            await self.sock.send(protocol.encode({"op": op, "id": rid, **fields}))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(rid, None)

    def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        self.sock.close(0)
        self.ctx.term()
