"""What the semantic cache learns from verified outcomes (pure logic; the store persists it).

An outcome is a (query, cached entry, cosine) pair whose meaning was checked off the request
path by comparing answers (core/cache/semantic_store.Verifier): a near-miss the model answered
anyway, or a served hit audited in the background class.

Per entry (vCache's idea: each entry learns how close a query must be):
  * `hi`: the highest cosine at which a query was verified to mean something else. Queries at
    or below hi + gap are refused for this entry from then on (tightening), even where the
    static decision would have served them.
  * `lo`: the lowest cosine at which a query was verified to mean the same (a promoted pair).
    Queries at lo or more that the static decision refused, without a hard conflict and above
    hi + gap, are served (promotion), while the namespace is within its error budget.
  * `group`: entries verified to share an answer share a group: they never contest a lookup.

Per namespace, the error budget: the audited hits' wrong share over a window of outcomes at the
current strictness. When it is over `budget` beyond doubt (the Wilson interval's low end, once
`min_audits` are in; on a full window, the share itself) the namespace's strictness rises a step
(the static decision needs that much more probability, cosine for the rules) and promotions
stop; when a full window puts it under the budget beyond doubt it relaxes half a step. The wrong hits that raised it also tightened their
entries, so the rate it reads falls for two reasons.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


def wilson(k: int, n: int, z: float = 1.645) -> tuple[float, float]:
    """The Wilson score interval of k successes in n (95% one-sided at each end)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    d = 1 + z * z / n
    return max(0.0, (centre - half) / d), min(1.0, (centre + half) / d)


@dataclass(slots=True)
class Bounds:
    lo: float | None = None  # lowest cosine verified to mean the same
    hi: float | None = None  # highest cosine verified to mean something else
    same: int = 0
    different: int = 0
    group: int = 0  # 0 = its own

    def learn(self, score: float, same: bool) -> None:
        if same:
            self.same += 1
            self.lo = score if self.lo is None else min(self.lo, score)
        else:
            self.different += 1
            self.hi = score if self.hi is None else max(self.hi, score)

    def refuses(self, score: float, gap: float) -> bool:
        """Tightened: a query this close was verified to mean something else."""
        return self.hi is not None and score <= self.hi + gap

    def promotes(self, score: float, gap: float) -> bool:
        """A query at least as close as a verified rephrasing (and clear of any verified miss)."""
        return self.lo is not None and score >= self.lo and not self.refuses(score, gap)

    def to_json(self) -> list:
        return [self.lo, self.hi, self.same, self.different, self.group]

    @classmethod
    def from_json(cls, v: list) -> "Bounds":
        return cls(*v)


@dataclass(slots=True)
class ErrorBudget:
    budget: float = 0.02
    window: int = 200
    min_audits: int = 20
    step: float = 0.01
    max_strictness: float = 0.2
    strictness: float = 0.0
    outcomes: deque = field(default_factory=deque)  # True = a wrong hit, newest last
    audited: int = 0
    wrong: int = 0

    def observe(self, wrong: bool) -> None:
        self.audited += 1
        self.wrong += wrong
        self.outcomes.append(bool(wrong))
        while len(self.outcomes) > self.window:
            self.outcomes.popleft()
        n = len(self.outcomes)
        if n < self.min_audits:
            return
        wrong = sum(self.outcomes)
        low, high = wilson(wrong, n)
        # each change is judged on outcomes at the current strictness only (the window restarts):
        # tighten as soon as the rate is over budget beyond doubt (or, on a full window, at all);
        # relax only when a full window puts it under the budget beyond doubt
        if low > self.budget or (n >= self.window and wrong / n > self.budget):
            self.strictness = min(self.max_strictness, self.strictness + self.step)
            self.outcomes.clear()
        elif n >= self.window and high < self.budget and self.strictness > 0:
            self.strictness = max(0.0, self.strictness - self.step / 2)
            self.outcomes.clear()

    @property
    def rate(self) -> float:
        return sum(self.outcomes) / len(self.outcomes) if self.outcomes else 0.0

    def to_json(self) -> dict:
        return {"strictness": round(self.strictness, 4), "audited": self.audited, "wrong": self.wrong,
                "window": list(self.outcomes)}

    @classmethod
    def from_json(cls, d: dict, **limits) -> "ErrorBudget":
        b = cls(**limits, strictness=float(d.get("strictness", 0.0)), audited=int(d.get("audited", 0)),
                wrong=int(d.get("wrong", 0)))
        b.outcomes.extend(bool(x) for x in d.get("window", [])[-b.window:])
        return b

    def report(self) -> dict:
        return {"audited": self.audited, "wrong": self.wrong, "window_rate": round(self.rate, 4),
                "strictness": round(self.strictness, 4), "budget": self.budget}
