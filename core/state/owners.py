"""The one seam between per-key state and where it lives: call the key's owner.

Every piece of per-key state (rate-limit buckets, sessions, exact-cache entries, event-log
partitions) has exactly one owner: the ring owner of its key. The services register their
owner-side handlers here, and every caller goes through `call` or `send`, so this is the only
place that decides "a direct call, because this worker is the owner" or "one mesh hop". A
Redis/Valkey Cluster backend for state shared past one box implements this same interface.

Handlers take one JSON-able payload and return a result, or a Future of one (an event append is
answered after its fsync). Local calls return the handler's value as it is, with no future and
no hop; remote calls return a Future that fails with OwnerUnavailable past the timeout or
RemoteError when the handler raised.
"""
from __future__ import annotations

import asyncio

from tidegate.core.messaging.mesh import OwnerUnavailable
from tidegate.core.state.ring import HashRing


class Owners:
    def __init__(self, slot: int, ring: HashRing):
        self.slot, self.ring = slot, ring
        self.handlers: dict = {}   # op -> handler(payload): what this worker answers as an owner
        self.mesh = None           # set by attach() once the mesh exists (none with one worker)
        self.stats = {"owner_unavailable": 0}

    def register(self, handlers: dict) -> None:
        self.handlers.update(handlers)

    def attach(self, mesh) -> None:
        self.mesh = mesh

    @property
    def loop(self):
        return self.mesh.loop if self.mesh is not None else asyncio.get_event_loop()

    def owner_of(self, key: bytes) -> int:
        """Where key lives; pass it to call/send (callers on hot paths keep it with their plan)."""
        return self.ring.owner(key)

    def is_down(self, owner: int) -> bool:
        """Nothing heard from owner for longer than a second: dead or respawning, not just slow."""
        return not self.is_local(owner) and self.mesh.silent_for(owner) > 1.0

    def is_local(self, owner: int) -> bool:
        return owner == self.slot or self.mesh is None

    def call(self, owner: int, op: str, payload, timeout: float):
        """handlers[op](payload) at owner: its value when local, else a Future of it."""
        if self.is_local(owner):
            return self.handlers[op](payload)
        fut = self.mesh.loop.create_future()
        self.mesh.request_cb(owner, op, payload, timeout, lambda ok, result: self._settle(fut, ok, result))
        return fut

    def send(self, owner: int, op: str, payload, timeout: float) -> None:
        """A call whose answer nobody waits for (refunds, cache inserts): a loss costs little."""
        if self.is_local(owner):
            self.handlers[op](payload)
        else:
            self.mesh.request_cb(owner, op, payload, timeout, _ignore)

    def _settle(self, fut: asyncio.Future, ok: bool, result) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(result)
            return
        if isinstance(result, OwnerUnavailable):
            self.stats["owner_unavailable"] += 1
        fut.set_exception(result)


def _ignore(ok, result) -> None:
    pass
