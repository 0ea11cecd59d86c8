"""What to do after an attempt at a remote backend failed: pure policy, no I/O.

An attempt ends in one `Outcome`; `decide` turns it into an `Action` (answer the client, try
again on the same backend, move to the next backend, or hand the request to the model's next
fallback model), within the request's deadline and the model's retry budget.

Whether an attempt may be repeated is decided by what the backend can have done with it:

- never ran: the connection failed before the body went out, or the backend refused it (429,
  503): retried freely;
- ran and ended: the backend answered 500/502/504, or a stream it was sending stopped (cut,
  stalled past `stall_timeout`, silent past `first_token_timeout`; tidegate closes the
  connection first, and OpenAI-compatible servers stop generating when their client goes): at
  most one answer can reach the client, so it is retried, and only the attempt that answers is
  billed;
- lost: the body went out and the connection dropped (or stayed silent past `header_timeout`)
  before any answer: a proxy in between may still be running it, or it ran and its answer was
  lost. Retried only where the operator allowed it (`retry_lost`) or the client did
  (an `Idempotency-Key` header); otherwise the client gets a 502/504 naming the backend.

Client errors (4xx but 408/429) are answered as they are; a 400 for the context length moves to
the next model of the fallback chain (a larger window), a content filter's refusal is never
retried anywhere.
"""
from __future__ import annotations

import email.utils
import random
import time
from collections import deque
from typing import NamedTuple

# outcome kinds
OK, UNSENT, REFUSED, FAILED, ENDED, LOST, CLIENT, CONTEXT, FILTERED = (
    "ok", "unsent", "refused", "failed", "ended", "lost", "client", "context", "filtered")
# actions
ANSWER, SAME, NEXT = "answer", "same", "next"

CONTEXT_CODES = ("context_length_exceeded", "context_window_exceeded")
FILTER_CODES = ("content_filter", "content_policy_violation", "content_filtered")


class Outcome(NamedTuple):
    kind: str                     # one of the kinds above
    failure: list | None = None   # the ERR payload the client gets if nothing better comes
    retry_after: float = 0.0      # the backend's Retry-After (s), 0 when none
    started: bool = False         # deltas of it reached the client (a stream under way)


class Action(NamedTuple):
    what: str          # ANSWER (the failure is the answer), SAME (backend) or NEXT (backend)
    wait: float = 0.0  # seconds to wait before the next attempt


def classify_status(status: int, code: str | None) -> str:
    """The kind of an attempt that got an HTTP error status back."""
    if status in (429, 503):
        return REFUSED
    if status in (408, 500, 502, 504) or status > 500:
        return FAILED
    if code in CONTEXT_CODES:
        return CONTEXT
    if code in FILTER_CODES:
        return FILTERED
    return CLIENT


def retry_after_seconds(value: str | None, now: float | None = None) -> float:
    """Retry-After as seconds (RFC 9110: delay-seconds or an HTTP-date); 0 when absent or bad."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return 0.0
    return max(0.0, when - (time.time() if now is None else now))


def backoff(attempt: int, base: float, cap: float, rng: random.Random = random) -> float:
    """Exponential backoff with full jitter (AWS's): uniform in [0, min(cap, base * 2^attempt)]."""
    return rng.uniform(0.0, min(cap, base * (2 ** attempt)))


class RetryBudget:
    """Finagle's retry budget: retries may add at most `ratio` of the requests of the last `ttl`
    seconds, plus `min_per_s` a second so a quiet model can still retry; a failing fleet is
    not hammered with retries of every request."""

    def __init__(self, ratio: float, min_per_s: float, ttl: float = 10.0):
        self.ratio, self.min_per_s, self.ttl = ratio, min_per_s, ttl
        self.requests: deque = deque()
        self.retries: deque = deque()
        self.exhausted = 0

    def _trim(self, now: float) -> None:
        for q in (self.requests, self.retries):
            while q and q[0] <= now - self.ttl:
                q.popleft()

    def deposit(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._trim(now)
        self.requests.append(now)

    def balance(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        return self.min_per_s * self.ttl + self.ratio * len(self.requests) - len(self.retries)

    def withdraw(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.balance(now) < 1:
            self.exhausted += 1
            return False
        self.retries.append(now)
        return True


class Policy(NamedTuple):
    attempts: int          # attempts per request at most, over all backends
    backoff_base: float    # s
    backoff_max: float     # s
    retry_after_max: float  # a Retry-After longer than this is not waited for on the same backend
    retry_lost: bool       # lost attempts may be retried (the operator's word for this model)

    @classmethod
    def of(cls, retry: dict) -> "Policy":
        return cls(retry["attempts"], retry["backoff_base"], retry["backoff_max"], retry["retry_after_max"],
                   retry["retry_lost"])


def decide(o: Outcome, attempt: int, policy: Policy, *, others: bool, time_left: float,
           idempotent: bool = False, can_continue: bool = True, rng: random.Random = random) -> Action:
    """What follows attempt number `attempt` (0 = the first) that ended in `o`. others: another
    backend of the model may take it now; time_left: seconds to the request's deadline;
    can_continue: a stream under way can go on elsewhere (an assistant-prefix continuation).
    ANSWER hands the failure to the routes, which may still give the request to the model's
    next fallback model (`falls_back`). The retry budget is the caller's."""
    if o.kind in (CLIENT, FILTERED, CONTEXT):
        return Action(ANSWER)
    if o.kind == LOST and not (policy.retry_lost or idempotent):
        return Action(ANSWER)
    if (o.started and not can_continue) or attempt + 1 >= policy.attempts:
        return Action(ANSWER)
    if others:  # another backend now; the one that refused cools off on its own (breaker, Retry-After)
        return Action(NEXT)
    wait = backoff(attempt, policy.backoff_base, policy.backoff_max, rng)
    if o.retry_after:
        if o.retry_after > policy.retry_after_max:
            return Action(ANSWER)
        wait = max(wait, o.retry_after)
    if wait >= time_left:
        return Action(ANSWER)
    return Action(SAME, wait)


# a model's failure that its next fallback model may answer instead (before any of it reached
# the client): the model is down, failing, full or rate-limited, or the prompt needs a larger
# window. Never a client error or a content filter's refusal.
FALLBACK_CODES = frozenset({"backend_unavailable", "backend_error", "backend_timeout", "backend_stream_cut",
                            "backend_rate_limited", "circuit_open", "worker_unavailable", "queue_full",
                            "generation_timeout", *CONTEXT_CODES})


def falls_back(failure) -> bool:
    """Whether an ERR payload ([status, message, code, param]) moves down the fallback chain."""
    return isinstance(failure, (list, tuple)) and len(failure) > 2 and failure[2] in FALLBACK_CODES
