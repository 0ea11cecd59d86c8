"""The one seam between per-key state and where it lives: call the key's owner.

Every piece of per-key state (rate-limit buckets, sessions, exact-cache entries, event-log
partitions) has exactly one owner: the ring owner of its key. The services register their
owner-side handlers here, and every caller goes through `call` or `send`, so this is the only
place that decides "a direct call, because this worker is the owner" or "one mesh hop". A
Redis/Valkey Cluster backend for state shared past one box implements this same interface
(start, close, purge, counters, shared, owner_of, call, send, is_local, is_down), and
tests/unit/state/test_owner_ops.py runs one conformance suite over both.

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
    HOLD_S = 2.0  # longest a call waits for a store being opened or handed over
    def __init__(self, slot: int, ring: HashRing):
        self.slot, self.ring = slot, ring
        self.handlers: dict = {}   # op -> handler(payload): what this worker answers as an owner
        self.mesh = None           # set by attach() once the mesh exists (none with one worker)
        self.stats = {"owner_unavailable": 0}
        self._held: list = []  # (op, payload, future) of calls waiting for a store (hold/open)
        self._home = None      # (slot, mesh) while redirected to the next generation

    # ---- the interface both state backends keep (this one and core/state/cluster.py) ----------
    async def start(self, wait: float) -> bool:
        """Nothing to connect: the worker attaches the mesh (one worker: every key is local)."""
        return True

    async def close(self) -> None:
        """Close a forwarding mesh left from a reload's release."""
        self.restore(())

    async def purge(self, tenant: str | None) -> int:
        """Shared exact-cache entries to drop: none here, each worker drops those it owns."""
        return 0

    def counters(self) -> dict:
        return dict(self.stats)

    @property
    def shared(self) -> bool:
        """Other askers share these owners (rate-limit leases then expire and go back)."""
        return self.peers > 1

    def register(self, handlers: dict) -> None:
        self.handlers.update(handlers)

    def hold(self, ops) -> None:
        """Until open() brings their handlers, calls of these ops wait (a Future each) instead
        of failing: the store behind them is being opened, or handed to another generation."""
        for op in ops:
            self.handlers[op] = lambda payload, op=op: self._wait_for(op, payload)

    def open(self, handlers: dict) -> None:
        """The store is open: register its handlers and answer the calls that waited."""
        self.handlers.update(handlers)
        held, self._held = self._held, []
        for op, payload, fut in held:
            if fut.done():
                continue
            try:
                result = handlers[op](payload)
            except Exception as e:
                fut.set_exception(e)
                continue
            if asyncio.isfuture(result):
                result.add_done_callback(lambda r, fut=fut: fut.done() or (
                    fut.set_exception(r.exception()) if r.exception() else fut.set_result(r.result())))
            else:
                fut.set_result(result)

    def redirect(self, mesh, ops) -> None:
        """This worker handed its stores to the next generation: from now on every call goes to
        that generation's owners over `mesh` (an asking-only one), and the store ops that still
        reach this worker from its own generation are forwarded to its successor there."""
        self._home = (self.slot, self.mesh)
        home, self.slot, self.mesh = self.slot, -1, mesh
        for op in ops:
            self.handlers[op] = lambda payload, op=op: self.call(home, op, payload, self.HOLD_S)

    def restore(self, ops) -> None:
        """The hand-off was called off (RESUME): own the slot again; its store ops wait for open()."""
        if self._home is not None:
            forward, (self.slot, self.mesh) = self.mesh, self._home
            self._home = None
            forward.close()
        self.hold(ops)

    def _wait_for(self, op: str, payload) -> asyncio.Future:
        loop = asyncio.get_event_loop()
        fut = loop.create_future()
        self._held.append((op, payload, fut))
        loop.call_later(self.HOLD_S, lambda: fut.done() or fut.set_exception(
            OwnerUnavailable(f"{op!r}: the store did not come back within {self.HOLD_S:g} s")))
        return fut

    def attach(self, mesh) -> None:
        self.mesh = mesh

    @property
    def peers(self) -> int:
        """How many owners share the keys (a rate-limit lease takes at most 1/(2 peers))."""
        return len(self.ring.nodes)

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
