"""Which queued generation requests get a sequence slot: strict priority by traffic class, slots
reserved per class, and within a class fair shares between tenants.

Classes, highest first: critical, standard, background. When a slot is free, the highest class
with work waiting goes first. A class may only take a slot if enough free slots remain for the
reservations of the *other* classes that are not yet using them, so a flood of background work
can never take the last slot that critical work has reserved. Requests whose deadline passed
while queued are handed back as expired, before any compute.

Inside a class, tenants share by the Virtual Token Counter of "Fairness in Serving Large
Language Models" (OSDI'24): each tenant's counter grows with the tokens it is served (prompt
tokens x1, generated tokens x2, charged by the batcher as they happen), the next request comes
from the waiting tenant with the lowest counter, and a tenant that becomes active again starts
no lower than the lowest active counter (no banked credit). So a tenant flooding its class gets
the share left over by the others, not the whole class. Pure logic: the inference worker owns
one and calls it between decode steps.
"""
from __future__ import annotations

from collections import deque

from tidegate.core.base.config import CLASSES

PROMPT_WEIGHT, OUTPUT_WEIGHT = 1.0, 2.0


class QueueFull(Exception):
    pass


class Scheduler:
    def __init__(self, n_slots: int, reserved: dict, queue_max: dict, fair: bool = True):
        self.n_slots, self.fair = n_slots, fair  # fair False: one FIFO per class (arrival order)
        # never reserve more than there is, and leave at least one slot anyone can use
        self.reserved = {c: min(reserved.get(c, 0), n_slots) for c in CLASSES}
        self.queue_max = {c: queue_max.get(c, 256) for c in CLASSES}
        self.queues: dict[str, dict[str, deque]] = {c: {} for c in CLASSES}  # class -> tenant -> FIFO
        self.depth = {c: 0 for c in CLASSES}
        self.running = {c: 0 for c in CLASSES}
        self.completed = {c: 0 for c in CLASSES}  # finished sequences: the drain rate for backpressure
        self.counters: dict[str, dict[str, float]] = {c: {} for c in CLASSES}  # virtual tokens served
        self.active: dict[str, dict[str, int]] = {c: {} for c in CLASSES}     # tenant -> sequences running

    def submit(self, item, cls: str) -> None:
        """Queue item (which has .deadline, and .tenant); raises QueueFull when the class's queue is full."""
        if self.depth[cls] >= self.queue_max[cls]:
            raise QueueFull(cls)
        t = self._tenant(item)
        qs = self.queues[cls]
        if t not in qs and not self.active[cls].get(t):  # (re)joining: no credit banked while away
            live = [self.counters[cls][x] for x in set(qs) | {x for x, n in self.active[cls].items() if n}
                    if x in self.counters[cls]]
            self.counters[cls][t] = max(self.counters[cls].get(t, 0.0), min(live) if live else 0.0)
        qs.setdefault(t, deque()).append(item)
        self.depth[cls] += 1

    def submit_all(self, items: list, cls: str) -> None:
        """Queue items together (the n choices of one request) or none: QueueFull when they do not all fit."""
        if self.depth[cls] + len(items) > self.queue_max[cls]:
            raise QueueFull(cls)
        for item in items:
            self.submit(item, cls)

    def _tenant(self, item) -> str:
        return getattr(item, "tenant", "") if self.fair else ""

    def charge(self, cls: str, tenant: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """Tokens served to tenant (the batcher calls this as it computes them)."""
        if not self.fair:
            tenant = ""
        c = self.counters[cls]
        c[tenant] = c.get(tenant, 0.0) + PROMPT_WEIGHT * prompt_tokens + OUTPUT_WEIGHT * output_tokens

    def can_take(self, cls: str) -> bool:
        free = self.n_slots - sum(self.running.values())
        held_for_others = sum(max(0, self.reserved[c] - self.running[c]) for c in CLASSES if c != cls)
        return free - held_for_others > 0

    def admit(self, now: float, may_start=None, started=None) -> tuple[list, list]:
        """(admitted, expired): items to start now, in priority order (the least-served tenant's
        first within a class), and items whose deadline passed in the queue. may_start(item):
        False keeps a tenant's head item (and those behind it) waiting this round (its request
        holds all the slots one request may); started(item) is told of each admitted one at once,
        so may_start sees it for the next pick."""
        admitted, expired = [], []
        for cls in CLASSES:
            qs = self.queues[cls]
            for t in list(qs):  # expiry first: dead requests never take a slot
                q = qs[t]  # (a choice held back by its own request's cap waits for it: not expired)
                while q and q[0].deadline <= now and (may_start is None or may_start(q[0])):
                    expired.append(q.popleft())
                    self.depth[cls] -= 1
                if not q:
                    del qs[t]
            counters = self.counters[cls]
            while qs and self.can_take(cls):
                ready = [x for x in qs if may_start is None or may_start(qs[x][0])]
                if not ready:
                    break
                t = min(ready, key=lambda x: counters.get(x, 0.0)) if len(ready) > 1 else ready[0]
                q = qs[t]
                item = q.popleft()
                admitted.append(item)
                if started is not None:
                    started(item)
                self.depth[cls] -= 1
                if not q:
                    del qs[t]
                self.running[cls] += 1
                self.active[cls][t] = self.active[cls].get(t, 0) + 1
        return admitted, expired

    def remove(self, pred) -> list:
        """Take queued items matching pred out (cancelled before they started)."""
        out = []
        for cls, qs in self.queues.items():
            for t in list(qs):
                keep = deque()
                for item in qs[t]:
                    (out if pred(item) else keep).append(item)
                self.depth[cls] -= len(qs[t]) - len(keep)
                if keep:
                    qs[t] = keep
                else:
                    del qs[t]
        return out

    def finished(self, cls: str, tenant: str = "") -> None:
        tenant = tenant if self.fair else ""
        self.running[cls] -= 1
        self.completed[cls] += 1
        a = self.active[cls]
        if a.get(tenant):
            a[tenant] -= 1
            if not a[tenant]:
                del a[tenant]
                if tenant not in self.queues[cls] and len(self.counters[cls]) > 10000:
                    self.counters[cls].pop(tenant, None)  # bounded memory: idle tenants are forgotten

    def suspend(self, cls: str, tenant: str = "") -> None:
        """A running item leaves its slot for a while (paused, evicted): not finished."""
        self.finished(cls, tenant)
        self.completed[cls] -= 1

    def resume(self, cls: str, tenant: str = "") -> None:
        """A suspended item takes a slot again."""
        tenant = tenant if self.fair else ""
        self.running[cls] += 1
        self.active[cls][tenant] = self.active[cls].get(tenant, 0) + 1

    def oldest(self, may_start=None) -> dict:
        """class -> when its oldest queued item that could start was submitted (.started), None
        when there is none: an item held back by its own request's cap (may_start) waits for its
        request, not for the class's capacity, and must not make the class look overloaded."""
        out = {}
        for c, qs in self.queues.items():
            heads = [q[0].started for q in qs.values() if q and (may_start is None or may_start(q[0]))]
            out[c] = min(heads) if heads else None
        return out

    def queued(self) -> dict:
        return dict(self.depth)
