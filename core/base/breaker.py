"""A circuit breaker for one downstream (a remote feature store, later every downstream).

closed: calls go through; `failures` consecutive failures (errors or missed deadlines) open it.
open: calls are refused at once (the caller takes its fallback) for `reset` seconds.
half-open: one probe call goes through; its success closes the breaker, its failure opens it
again for another `reset`. Pure logic on a monotonic clock, one per process and downstream: no
locks, no I/O, so it is tested without a server.
"""
from __future__ import annotations

import time

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Breaker:
    def __init__(self, failures: int = 5, reset: float = 1.0, clock=time.monotonic):
        self.threshold, self.reset, self.clock = failures, reset, clock
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False  # half-open: the one probe is out
        self.stats = {"opened": 0, "refused": 0}

    def allow(self) -> bool:
        """May a call go out now? (In half-open only one probe at a time does.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self.clock() - self.opened_at < self.reset:
                self.stats["refused"] += 1
                return False
            self.state, self.probing = HALF_OPEN, False
        if self.probing:
            self.stats["refused"] += 1
            return False
        self.probing = True
        return True

    def success(self) -> None:
        self.state, self.failures, self.probing = CLOSED, 0, False

    def failure(self) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            if self.state != OPEN:
                self.stats["opened"] += 1
            self.state, self.opened_at, self.probing = OPEN, self.clock(), False
