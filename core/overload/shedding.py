"""What a request of each traffic class gets when its downstream is overloaded (or an operator
forces shedding for a drill: `tidegate admin shed on CLASS`).

overload.shed maps a class to a policy: `never` (always served), `reject` (503 with Retry-After
from the downstream's drain rate), or `cached` (a cached approximation, in this order: a stale
exact-cache entry, the nearest semantic entry when approximations are on, the entity's last
prediction, a configured static answer; else 503 like reject). A shed answer says so:
`x-tidegate-shed: CLASS` and `x-tidegate-cache: stale | approximate | fallback`; shed answers are
counted per class and kind in /metrics (shed_*), never inside the cache hit rates. Box-level
overload (the supervisor's memory and fd watch) sheds every class but critical the same way.
"""
from __future__ import annotations

from tidegate.core.base.config import CLASSES
from tidegate.core.http.http11 import service_unavailable

POLICIES = ("never", "reject", "cached")


def policy_problem(v, cfg=None) -> str | None:
    for c in CLASSES:
        if v.get(c) not in POLICIES:
            return f"{c}: needs a policy, one of {', '.join(POLICIES)}"
    extra = set(v) - set(CLASSES)
    return f"unknown traffic class(es) {', '.join(sorted(extra))}" if extra else None


class Shedder:
    def __init__(self, cfg: dict, view=None, lag=None):
        self.policy = cfg["overload"]["shed"]
        self.view = view          # PressureView, when downstreams publish
        self.lag = lag            # LoopLag: this ingress worker's own pressure
        self.forced: set = set()  # classes an operator sheds now (admin shed on|off)
        self.box = False          # box-level overload: every class but critical is shed
        self.stats = {f"shed_{c}_{k}": 0 for c in CLASSES
                      for k in ("stale", "approximate", "fallback", "rejected")}

    def counters(self) -> dict:
        return dict(self.stats)

    def check(self, cls: str, source: str) -> int | None:
        """Retry-After seconds when a request of cls for downstream source is to be shed, else None."""
        if self.box and cls != "critical":
            return 1
        if self.policy[cls] == "never":
            return None
        if cls in self.forced or (self.lag is not None and self.lag.overloaded and cls == "background"):
            return 1
        return self.view.shedding(source, cls) if self.view is not None else None

    def cached(self, cls: str) -> bool:
        return self.policy[cls] == "cached"

    def served(self, cls: str, kind: str) -> list:
        """Count a shed answer of kind (stale | fallback); the header that marks it as shed (the
        answer's x-tidegate-cache says the kind)."""
        self.stats[f"shed_{cls}_{kind}"] += 1
        return [(b"x-tidegate-shed", cls.encode())]

    def reject(self, cls: str, retry_after: int, what: str):
        self.stats[f"shed_{cls}_rejected"] += 1
        e = service_unavailable(f"{what} is overloaded: {cls} traffic is shed; retry after {retry_after}s",
                                "shed", retry_after=retry_after)
        e.headers.append((b"x-tidegate-shed", cls.encode()))
        return e
