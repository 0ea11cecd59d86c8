"""Hydration: a model's inputs, joined from every source in the model's declared order.

A model declares its inputs as a list of names, each from one source:

    request.NAME        a feature the request carries itself (required, a number)
    VIEW.FEATURE        one feature of a feature view (the LMDB registry or Redis, by the view's source)
    VIEW.*              every feature of a feature view, in the view's order
    events.VIEW         the value of an event-log view (count, sum, avg or a numeric last)

Feature views and event views say which entity type keys them (`entity`, e.g. user); the request
gives one id per entity type (`entities = {user = "u1"}`). `Plan` compiles the list once (a config
problem names the input); `Hydrator` fills a batch of requests: the request's own features, the
registry and the event views inline (LMDB snapshot reads: microseconds), and Redis awaited in one
pipelined round trip bounded by the traffic class's deadline. Whatever a source cannot give takes
the feature's default, and the answer says why per feature: `missing` (no row, or no value),
`expired` (older than the view's ttl), `late` (past the deadline), `down` (error or breaker open).
"""
from __future__ import annotations

import asyncio

import numpy as np

from tidegate.core.features.registry import EXPIRED, View
from tidegate.core.features.sources import Late

MISSING, EXPIRED_R, LATE, DOWN = "missing", "expired", "late", "down"


class Plan:
    """One model's inputs compiled against the declared views; ValueError names a bad input."""

    def __init__(self, inputs: list, fviews: dict[str, View], eviews: dict[str, dict]):
        self.names: list[str] = []
        self.request: list[tuple[int, str]] = []
        self.views: dict[str, list[tuple[int, int]]] = {}  # feature view -> [(position, feature index)]
        self.events: list[tuple[int, str, str]] = []        # (position, event view, entity type)
        defaults: list[float] = []
        if not isinstance(inputs, list) or not inputs:
            raise ValueError("inputs must be a non-empty array of names (request.X, VIEW.FEATURE, VIEW.*, events.VIEW)")
        for item in inputs:
            if not isinstance(item, str) or "." not in item:
                raise ValueError(f"input {item!r} must be request.NAME, VIEW.FEATURE, VIEW.* or events.VIEW")
            src, name = item.split(".", 1)
            if src == "request":
                self._add(item, 0.0, defaults)
                self.request.append((len(self.names) - 1, name))
            elif src == "events":
                if name not in eviews:
                    raise ValueError(f"input {item!r}: no event view {name!r} in events.views")
                self._add(item, float(eviews[name].get("default", 0)), defaults)
                self.events.append((len(self.names) - 1, name, eviews[name].get("entity", "entity")))
            elif src in fviews:
                v = fviews[src]
                feats = v.features if name == "*" else [name]
                for f in feats:
                    if f not in v.defaults:
                        raise ValueError(f"input {item!r}: feature view {src!r} has no feature {f!r}")
                    self._add(f"{src}.{f}", float(v.defaults[f]), defaults)
                    self.views.setdefault(src, []).append((len(self.names) - 1, v.features.index(f)))
            else:
                raise ValueError(f"input {item!r}: {src!r} is not request, events or a feature view "
                                 f"(declared: {', '.join(fviews) or 'none'})")
        self.defaults = np.array(defaults, dtype=np.float32)
        self.fviews = {name: fviews[name] for name in self.views}
        self.entity_types = sorted({v.entity for v in self.fviews.values()} | {e for _, _, e in self.events})
        self.request_names = [n for _, n in self.request]
        # per view: positions in the model's vector and the feature columns they take
        self.cols = {name: (np.array([p for p, _ in pc]), np.array([c for _, c in pc])) for name, pc in self.views.items()}

    def _add(self, name: str, default: float, defaults: list) -> None:
        if name in self.names:
            raise ValueError(f"input {name!r} is listed twice")
        self.names.append(name)
        defaults.append(default)


class Instance:
    """One prediction's own part: the caller's tenant, its entity ids and its request features."""
    __slots__ = ("tenant", "entities", "features")

    def __init__(self, tenant: str, entities: dict, features: dict):
        self.tenant, self.entities, self.features = tenant, entities, features


class Hydrator:
    def __init__(self, registry, event_views, remote, deadlines: dict):
        self.registry, self.event_views, self.remote, self.deadlines = registry, event_views, remote, deadlines

    def local(self, plan: Plan, batch: list[Instance]):
        """(X, reasons) with everything but the remote views filled: request features, registry
        rows and event views, each source read in one snapshot for the whole batch; reasons[i]
        maps an input name to why it took its default."""
        X = np.tile(plan.defaults, (len(batch), 1))
        reasons: list[dict] = [{} for _ in batch]
        for i, inst in enumerate(batch):
            row, feats = X[i], inst.features
            for pos, name in plan.request:
                row[pos] = feats[name]
        local = [v for v in plan.views if plan.fviews[v].source == "registry"]
        if local:
            wants = [(inst.tenant, v, inst.entities[plan.fviews[v].entity]) for inst in batch for v in local]
            got = iter(self.registry.fetch(wants))
            for i in range(len(batch)):
                for view in local:
                    raw, _version = next(got)
                    if raw:
                        pos, cols = plan.cols[view]
                        X[i, pos] = plan.fviews[view].values(raw)[cols]
                    else:
                        self._defaulted(plan, view, reasons[i], EXPIRED_R if raw is EXPIRED else MISSING)
        if plan.events:
            wants = [(view, inst.tenant, inst.entities[etype]) for inst in batch for _, view, etype in plan.events]
            got = iter(self.event_views.get_many(wants) if self.event_views else [None] * len(wants))
            for i in range(len(batch)):
                for pos, _, _ in plan.events:
                    value = next(got)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        X[i, pos] = value
                    else:
                        reasons[i][plan.names[pos]] = MISSING
        return X, reasons

    def remote_views(self, plan: Plan) -> list[str]:
        return [v for v in plan.views if plan.fviews[v].source == "redis"]

    def fill_remote(self, plan: Plan, batch: list[Instance], X, reasons, cls: str) -> asyncio.Future:
        """The redis views of the whole batch in one round trip, within the class's deadline; the
        future is done once X and reasons are filled (callbacks, no Task: this is per batch)."""
        views = self.remote_views(plan)
        wants = [(v, inst.tenant, inst.entities[plan.fviews[v].entity]) for inst in batch for v in views]
        done = asyncio.get_running_loop().create_future()
        if self.remote is None:
            self._all_defaulted(plan, views, reasons, DOWN)
            done.set_result(None)
            return done

        def filled(f: asyncio.Future) -> None:
            e = f.exception()
            if e is not None:
                self._all_defaulted(plan, views, reasons, LATE if isinstance(e, Late) else DOWN)
            else:
                self._fill_rows(plan, views, f.result(), X, reasons)
            done.set_result(None)
        self.remote.fetch(wants, self.deadlines[cls]).add_done_callback(filled)
        return done

    def _fill_rows(self, plan: Plan, views: list[str], rows: list, X, reasons) -> None:
        k = 0
        for i in range(len(reasons)):
            for v in views:
                raw = rows[k]
                k += 1
                view = plan.fviews[v]
                if raw is not None and len(raw) == view.dtype.itemsize:
                    pos, cols = plan.cols[v]
                    X[i, pos] = view.values(raw)[cols]
                else:  # absent (or written for another schema: not read as this one)
                    self._defaulted(plan, v, reasons[i], MISSING)

    def _all_defaulted(self, plan: Plan, views: list[str], reasons: list, why: str) -> None:
        for r in reasons:
            for v in views:
                self._defaulted(plan, v, r, why)

    @staticmethod
    def _defaulted(plan: Plan, view: str, reasons: dict, why: str) -> None:
        feats = plan.fviews[view].features
        for _, c in plan.views[view]:
            reasons[f"{view}.{feats[c]}"] = why
