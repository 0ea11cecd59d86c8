"""Which queued generation requests get a sequence slot: strict priority by traffic class, with
slots reserved per class.

Classes, highest first: critical, standard, background. When a slot is free, the highest class
with work waiting goes first. A class may only take a slot if enough free slots remain for the
reservations of the *other* classes that are not yet using them, so a flood of background work
can never take the last slot that critical work has reserved. Requests whose deadline passed
while queued are handed back as expired, before any compute. Pure logic: the inference worker
owns one and calls it between decode steps.
"""
from __future__ import annotations

from collections import deque

CLASSES = ("critical", "standard", "background")


class QueueFull(Exception):
    pass


class Scheduler:
    def __init__(self, n_slots: int, reserved: dict, queue_max: dict):
        self.n_slots = n_slots
        # never reserve more than there is, and leave at least one slot anyone can use
        self.reserved = {c: min(reserved.get(c, 0), n_slots) for c in CLASSES}
        self.queue_max = {c: queue_max.get(c, 256) for c in CLASSES}
        self.queues: dict[str, deque] = {c: deque() for c in CLASSES}
        self.running = {c: 0 for c in CLASSES}
        self.completed = {c: 0 for c in CLASSES}  # finished sequences: the drain rate for backpressure

    def submit(self, item, cls: str) -> None:
        """Queue item (which has .deadline); raises QueueFull when the class's queue is full."""
        q = self.queues[cls]
        if len(q) >= self.queue_max[cls]:
            raise QueueFull(cls)
        q.append(item)

    def can_take(self, cls: str) -> bool:
        free = self.n_slots - sum(self.running.values())
        held_for_others = sum(max(0, self.reserved[c] - self.running[c]) for c in CLASSES if c != cls)
        return free - held_for_others > 0

    def admit(self, now: float) -> tuple[list, list]:
        """(admitted, expired): items to start now, in priority order, and items whose deadline
        passed in the queue."""
        admitted, expired = [], []
        for cls in CLASSES:
            q = self.queues[cls]
            while q:
                if q[0].deadline <= now:
                    expired.append(q.popleft())
                    continue
                if not self.can_take(cls):
                    break
                admitted.append(q.popleft())
                self.running[cls] += 1
        return admitted, expired

    def remove(self, pred) -> list:
        """Take queued items matching pred out (cancelled before they started)."""
        out = []
        for cls, q in self.queues.items():
            keep = deque()
            for item in q:
                (out if pred(item) else keep).append(item)
            self.queues[cls] = keep
        return out

    def finished(self, cls: str) -> None:
        self.running[cls] -= 1
        self.completed[cls] += 1

    def oldest(self) -> dict:
        """class -> when its oldest queued item was submitted (.started), None when empty."""
        return {c: (q[0].started if q else None) for c, q in self.queues.items()}

    def queued(self) -> dict:
        return {c: len(q) for c, q in self.queues.items()}
