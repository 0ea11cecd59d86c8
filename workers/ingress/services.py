"""The ingress worker's wiring: every service it runs, built once at boot, and the routes over them.

`build()` is the only place that decides what exists (a semantic cache, feature sources, the
model worker, remote LLM backends) from the configuration; it returns a `Services` whose fields
are each one service, each with one owner. The worker (worker.py) runs the lifecycle around it.
Every service reports its own counters(); `Services.counters()` merges them for the heartbeat.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from tidegate.core.base import config
from tidegate.core.base.breaker import Breaker
from tidegate.core.base.jsonlog import log
from tidegate.core.cache.exact import ExactCache
from tidegate.core.cache.semantic_client import SemanticClient
from tidegate.core.features.hydrate import Hydrator
from tidegate.core.features.registry import Registry
from tidegate.core.features.sources import RedisSource
from tidegate.core.http.websocket import WsHub
from tidegate.core.llm.remote import RemoteModel
from tidegate.core.messaging import endpoints
from tidegate.core.messaging.worker_client import WorkerClient
from tidegate.core.overload.classes import Classes
from tidegate.core.overload.pressure import LoopLag, PressureView
from tidegate.core.overload.shedding import Shedder
from tidegate.core.predict.models import Model, check_inputs, version_of
from tidegate.core.predict.pipeline import Predictor, plan_for
from tidegate.core.state.auth import ApiKeys
from tidegate.core.state.cluster import ClusterOwners
from tidegate.core.state.ratelimit import RateLimiter
from tidegate.workers.ingress.door import EarlyShed
from tidegate.workers.ingress.guard import Guard
from tidegate.workers.ingress.routes.events import EventRoutes
from tidegate.workers.ingress.routes.features import FeatureRoutes
from tidegate.workers.ingress.routes.openai import OpenAIRoutes
from tidegate.workers.ingress.routes.ops import OpsRoutes
from tidegate.workers.ingress.routes.predict import PredictRoutes
from tidegate.workers.ingress.routes.request import downstream
from tidegate.workers.ingress.routes.responses import ResponsesRoute
from tidegate.workers.ingress.routes.sessions import SessionRoutes
from tidegate.workers.ingress.routes.undeclared import UndeclaredRoutes
from tidegate.workers.ingress.routes.views import ViewRoutes
from tidegate.workers.ingress.routes.ws import WsRoutes
from tidegate.workers.ingress.scoring import worker_scorer


@dataclass
class Services:
    """What an ingress worker runs besides HTTP and its stores, one owner each."""
    owners: object                 # this box's ring owners (Owners): event-log partitions always
    state: object                  # sessions, buckets, exact entries: `owners`, or ClusterOwners (state.backend)
    keys: ApiKeys
    ratelimit: RateLimiter
    exact: ExactCache
    guard: Guard
    classes: Classes
    pressure: PressureView         # the downstreams' published pressure
    shedder: Shedder
    ws: WsHub
    llm: dict = field(default_factory=dict)        # model name -> WorkerClient | RemoteModel
    openai: OpenAIRoutes | None = None
    embedder: WorkerClient | None = None           # the semantic cache's embedder process
    semantic: SemanticClient | None = None
    hydrator: Hydrator | None = None               # feature rows for predictions and /v1/features
    feature_store: RedisSource | None = None       # Redis-backed feature views
    model_worker: WorkerClient | None = None       # tabular models scored out of process
    predictors: dict = field(default_factory=dict)  # model name -> Predictor
    breakers: dict = field(default_factory=dict)   # downstream -> Breaker (/metrics, admin breakers)

    def counters(self) -> dict:
        """Every service's counters, merged (a name two report is summed)."""
        out: dict = {}
        parts = [self.owners, self.state, self.ratelimit, self.exact, self.shedder, self.ws, self.openai, self.semantic,
                 self.feature_store, *self.llm.values()]
        seen = set()
        for part in parts:
            if part is None or id(part) in seen or not hasattr(part, "counters"):
                continue
            seen.add(id(part))
            for k, v in part.counters().items():
                out[k] = out.get(k, 0) + v
        if self.predictors:
            stats = [p.stats for p in self.predictors.values()]
            out.update(predict_batches=sum(s["batches"] for s in stats), predict_requests=sum(s["items"] for s in stats),
                       predict_defaulted=sum(s["defaulted"] for s in stats))
        out["breakers_open"] = sum(b.state != "closed" for b in self.breakers.values())
        out["breakers_opened"] = sum(b.stats["opened"] for b in self.breakers.values())
        return out

    async def close(self) -> None:
        for client in [*self.llm.values(), self.embedder, self.model_worker]:
            if client is not None:
                client.close()
        if self.feature_store is not None:
            await self.feature_store.close()
        await self.state.close()
        self.pressure.close()
        if self.shedder.lag is not None:
            self.shedder.lag.close()


def build(cfg: dict, spec: dict, loop, ctx, owners, views, http, router, link, snapshot) -> Services:
    """Every service of this worker and its routes on `router`. owners: this box's ring owners
    (event-log partitions always stay with them); ctx: the worker's ZeroMQ context."""
    gen, frame = spec["gen"], cfg["server"]["max_frame_bytes"]
    state = ClusterOwners(cfg) if cfg["state"]["backend"] == "cluster" else owners
    keys = ApiKeys(cfg["auth"]["keys"], cfg["classes"])
    ratelimit = RateLimiter(cfg, state)
    exact = ExactCache(cfg, state)
    downstreams = {m["name"]: endpoints.pressure(cfg, "inference", m["name"], gen) for m in config.local_models(cfg)}
    if any(m.get("worker") for m in cfg["predict"]["models"]):
        downstreams["models"] = endpoints.pressure(cfg, "models", "", gen)
    pressure = PressureView(ctx, loop, downstreams)
    ov = cfg["overload"]
    lag = LoopLag(loop, ov["loop_lag"], ov["loop_lag_share"]) if ov["loop_lag"] else None
    s = Services(owners=owners, state=state, keys=keys, ratelimit=ratelimit, exact=exact, guard=Guard(cfg, keys, state, ratelimit),
                 classes=Classes(cfg), pressure=pressure, shedder=Shedder(cfg, pressure, lag),
                 ws=WsHub(cfg["websocket"], loop, log, server=http))
    routes = [OpsRoutes(cfg, link, snapshot), SessionRoutes(cfg, s.guard)]
    if cfg["events"]["enabled"]:
        routes += [EventRoutes(cfg, owners), ViewRoutes(views)]
    if cfg["features"]["views"] or cfg["predict"]["models"]:
        _hydration(s, cfg, views)
        routes.append(FeatureRoutes(s.hydrator, cfg["predict"]))
    if cfg["predict"]["models"]:
        _predictors(s, cfg, spec, loop, ctx)
        routes.append(PredictRoutes(cfg, s.predictors, s.shedder, s.classes))
    models = config.models(cfg)
    http.early = EarlyShed(keys, s.classes, s.shedder, models, s.predictors)
    http.early_bytes = ov["early_bytes"]
    if models:
        s.llm = {m["name"]: RemoteModel(m, cfg, loop) if m.get("backends") else
                 WorkerClient(ctx, endpoints.worker(cfg, "inference", m["name"], gen), loop, frame) for m in models}
        if config.semantic_enabled(cfg):
            s.embedder = WorkerClient(ctx, endpoints.worker(cfg, "embedder", "", gen), loop, frame)
            s.semantic = SemanticClient(cfg, s.embedder)
            s.breakers["embedder"] = s.semantic.breaker
        for m in models:
            s.breakers[downstream(m["name"])] = Breaker.from_config(cfg["breakers"], slow_call=1e9)
            for b in getattr(s.llm[m["name"]], "backends", ()):  # a remote model: one breaker per backend
                s.breakers[f"backend:{m['name']}:{b.url}"] = b.breaker
        s.openai = OpenAIRoutes(cfg, models, s.llm, ratelimit, s.classes, exact, s.semantic, s.shedder, s.breakers)
        routes += [s.openai, ResponsesRoute(s.openai)]
    routes.append(UndeclaredRoutes(predict=not cfg["predict"]["models"],
                                   features=not (cfg["features"]["views"] or cfg["predict"]["models"]),
                                   views=not cfg["events"]["enabled"]))
    routes.append(WsRoutes(cfg, s.ws, router))
    for group in routes:
        group.add_to(router, s.guard)
    return s


def _hydration(s: Services, cfg: dict, views) -> None:
    """The feature sources, read-only here: the registry, the event views, Redis when a view uses it."""
    fc = cfg["features"]
    registry = Registry(os.path.join(cfg["server"]["data_dir"], "features"), fc["views"])
    remote = {n: v for n, v in registry.views.items() if v.source == "redis"}
    if remote:
        s.feature_store = RedisSource(fc, remote, cfg["breakers"])
        s.breakers["redis"] = s.feature_store.breaker
    s.hydrator = Hydrator(registry, views if cfg["events"]["enabled"] else None, s.feature_store, fc["deadline"])


def _predictors(s: Services, cfg: dict, spec: dict, loop, ctx) -> None:
    """One Predictor per tabular model: scored inline, or in the model worker (worker = true)."""
    if any(m.get("worker") for m in cfg["predict"]["models"]):
        s.model_worker = WorkerClient(ctx, endpoints.worker(cfg, "models", "", spec["gen"]), loop,
                                      cfg["server"]["max_frame_bytes"])
    for m in cfg["predict"]["models"]:
        plan = plan_for(m, cfg)
        if m.get("worker"):
            breaker = s.breakers[f"models:{m['name']}"] = Breaker.from_config(cfg["breakers"])
            score = worker_scorer(s.model_worker, m["name"], cfg["predict"]["worker_timeout"], breaker, loop)
            version = version_of(m["path"], m.get("version", ""))
        else:
            model = Model(m["path"], m.get("version", ""))
            check_inputs(model, plan, m["name"])
            score, version = (lambda X, cls, predict=model.predict: predict(X)), model.version
        s.predictors[m["name"]] = Predictor(m, plan, s.hydrator, score, version, loop, cfg["predict"],
                                            last_served=s.exact)
