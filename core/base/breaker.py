"""A circuit breaker for one downstream, in resilience4j's manner: a sliding window over the
outcomes of the last `window` calls.

closed: calls go through. Once the window holds at least `min_calls` outcomes, a failure rate
of `failure_rate` or more, or a share of calls slower than `slow_call` seconds of `slow_rate` or
more, opens it.
open: calls are refused at once (the caller takes its fallback) for `open_for` seconds.
half-open: `trial_calls` calls go through; when they are all back, the breaker closes if their
failure and slow rates are under the thresholds, else it opens again for another `open_for` (as
it does when a trial is not back within `open_for`: a caller that gave up never reports).
Pure logic on a monotonic clock, one per process and downstream: no locks, no I/O. The windows
are ext/ringbuf Windows (no allocation per call).
"""
from __future__ import annotations

import time
from collections import OrderedDict

from tidegate.ext.ringbuf import Window

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Breaker:
    def __init__(self, window: int = 50, min_calls: int = 10, failure_rate: float = 0.5, slow_call: float = 1e9,
                 slow_rate: float = 1.0, open_for: float = 1.0, trial_calls: int = 3, clock=time.monotonic):
        self.min_calls, self.failure_rate, self.slow_call, self.slow_rate = min_calls, failure_rate, slow_call, slow_rate
        self.open_for, self.trial_calls, self.clock = open_for, trial_calls, clock
        self.failed, self.slow = Window(window), Window(window)  # 1.0 per failed / slow call, else 0.0
        self.state = CLOSED
        self.opened_at = self.half_opened_at = 0.0
        self.trials_out = self.trials_back = 0
        self.trial_failed = self.trial_slow = 0
        self.stats = {"opened": 0, "refused": 0}

    @classmethod
    def from_config(cls, bc: dict, slow_call: float | None = None) -> "Breaker":
        """One from a [breakers] section; slow_call overrides its slow-call time (per downstream)."""
        return cls(bc["window"], bc["min_calls"], bc["failure_rate"], bc["slow_call"] if slow_call is None
                   else slow_call, bc["slow_rate"], bc["open_for"], bc["trial_calls"])

    def allow(self) -> bool:
        """May a call go out now? (In half-open only trial_calls of them do.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self.clock() - self.opened_at < self.open_for:
                self.stats["refused"] += 1
                return False
            self.state, self.half_opened_at = HALF_OPEN, self.clock()
            self.trials_out = self.trials_back = self.trial_failed = self.trial_slow = 0
        if self.trials_out >= self.trial_calls:
            if self.trials_back < self.trial_calls and self.clock() - self.half_opened_at > self.open_for:
                self._open()  # trials never heard from (the caller gave up on them): as good as failed
            self.stats["refused"] += 1
            return False
        self.trials_out += 1
        return True

    def record(self, ok: bool, seconds: float = 0.0) -> None:
        """The outcome of a call that allow() let through."""
        slow = seconds >= self.slow_call
        if self.state == HALF_OPEN:
            self.trials_back += 1
            self.trial_failed += not ok
            self.trial_slow += slow
            if self.trials_back >= self.trial_calls:
                n = self.trials_back
                if self.trial_failed / n >= self.failure_rate or self.trial_slow / n >= self.slow_rate:
                    self._open()
                else:
                    self.state = CLOSED
                    self.failed.clear()
                    self.slow.clear()
            return
        if self.state == OPEN:
            return  # a call from before it opened, settling late
        self.failed.push(0.0 if ok else 1.0)
        self.slow.push(1.0 if slow else 0.0)
        if len(self.failed) >= self.min_calls and (self.failed.mean() >= self.failure_rate
                                                   or self.slow.mean() >= self.slow_rate):
            self._open()

    def success(self, seconds: float = 0.0) -> None:
        self.record(True, seconds)

    def failure(self) -> None:
        self.record(False)

    def _open(self) -> None:
        self.state, self.opened_at = OPEN, self.clock()
        self.stats["opened"] += 1

    def describe(self) -> dict:
        return {"state": self.state, "calls": len(self.failed), "failure_rate": round(self.failed.mean(), 3),
                "slow_rate": round(self.slow.mean(), 3), **self.stats}


class TenantBreakers:
    """One Breaker per tenant of a downstream, made as first needed (at most `max_tenants`, the
    least recently used forgotten): failures that only a tenant's own requests meet (its inputs
    crash the worker's code for that request) refuse that tenant, never the others, while the
    downstream's shared breaker counts only what fails for everyone (the worker gone, wedged,
    a backend down)."""

    def __init__(self, make, max_tenants: int = 10000):
        self.make, self.max_tenants = make, max_tenants
        self.by_tenant: OrderedDict[str, Breaker] = OrderedDict()

    def of(self, tenant: str) -> Breaker:
        b = self.by_tenant.get(tenant)
        if b is None:
            b = self.by_tenant[tenant] = self.make()
            if len(self.by_tenant) > self.max_tenants:
                self.by_tenant.popitem(last=False)
        else:
            self.by_tenant.move_to_end(tenant)
        return b

    def open_now(self) -> int:
        return sum(b.state != CLOSED for b in self.by_tenant.values())
