"""Ingress worker process: one single-threaded uvloop (epoll) event loop serving HTTP.

Started by the supervisor with its listening sockets inherited (one SO_REUSEPORT socket per
slot and address, kept open by the supervisor so a replaced worker's queue is never dropped)
and its spec in $TIDEGATE_WORKER_SPEC. It reports READY once it accepts, heartbeats with a
metrics snapshot, drains on SIGTERM, exits at once on SIGQUIT and ignores SIGINT (the
supervisor decides). Exit codes: 0 clean, 3 failed to boot (the supervisor then halts).
"""
from __future__ import annotations

import asyncio
import gc
import glob
import os
import signal
import socket
import sys
import time

import lmdb
import numpy as np
import uvloop
import zmq

from tidegate.core.base import config
from tidegate.core.base.breaker import Breaker
from tidegate.core.base.filelock import StoreLock, StoreLocked
from tidegate.core.base.jsonlog import log
from tidegate.core.base.metrics import WorkerMetrics
from tidegate.core.cache.exact import ExactCache
from tidegate.core.cache.semantic_client import SemanticClient
from tidegate.core.events.owner import PartitionOwner
from tidegate.core.events.views import ViewReader
from tidegate.core.features.hydrate import Hydrator
from tidegate.core.features.registry import Registry
from tidegate.core.features.sources import RedisSource
from tidegate.core.http.http11 import HttpServer
from tidegate.core.http.router import Router
from tidegate.core.messaging import endpoints, protocol
from tidegate.core.messaging.link import SupervisorLink
from tidegate.core.messaging.mesh import Mesh
from tidegate.core.messaging.worker_client import Unavailable, WorkerClient
from tidegate.core.overload.pressure import LoopLag, PressureView
from tidegate.core.overload.classes import Classes
from tidegate.core.overload.shedding import Shedder
from tidegate.core.predict.models import Model, check_inputs, version_of
from tidegate.core.predict.pipeline import Predictor, plan_for
from tidegate.core.runtime.process import WORKER_BOOT_ERROR, connection_cap, open_fds, start_worker
from tidegate.core.state.auth import ApiKeys
from tidegate.core.state.owners import Owners
from tidegate.core.http.websocket import WsHub
from tidegate.core.llm.remote import RemoteModel
from tidegate.core.state.cluster import ClusterOwners
from tidegate.core.state.ratelimit import RateLimiter
from tidegate.core.state.ring import HashRing
from tidegate.core.state.sessions import SessionStore
from tidegate.ext.httpconn import HttpConnection
from tidegate.workers.ingress.door import EarlyShed
from tidegate.workers.ingress.guard import Guard
from tidegate.workers.ingress.routes.events import EventRoutes
from tidegate.workers.ingress.routes.features import FeatureRoutes
from tidegate.workers.ingress.routes.openai import OpenAIRoutes
from tidegate.workers.ingress.routes.responses import ResponsesRoute
from tidegate.workers.ingress.routes.ops import OpsRoutes
from tidegate.workers.ingress.routes.predict import ModelError, PredictRoutes
from tidegate.workers.ingress.routes.sessions import SessionRoutes
from tidegate.workers.ingress.routes.views import ViewRoutes
from tidegate.workers.ingress.routes.ws import WsRoutes

FAILPOINTS = frozenset(os.environ.get("TIDEGATE_FAILPOINTS", "").split(","))  # fault injection for tests


class IngressWorker:
    def __init__(self, spec: dict):
        self.spec = spec
        self.cfg = spec["config"]
        self.slot = spec["slot"]
        self.loop = asyncio.get_running_loop()
        self.metrics = WorkerMetrics()
        self.n_slots = spec["n_slots"]
        # every piece of per-key state registers its owner-side ops with the one seam
        self.owners = Owners(self.slot, HashRing(range(self.n_slots)))
        self.keys = ApiKeys(self.cfg["auth"]["keys"], self.cfg["classes"])
        # sessions, buckets and exact-cache entries: at this box's ring owners, or in a shared cluster
        # (the same seam; event-log partitions always stay with this box's owners)
        self.state = ClusterOwners(self.cfg) if self.cfg["state"]["backend"] == "cluster" else self.owners
        self.ratelimit = RateLimiter(self.cfg, self.state)
        self.exact = ExactCache(self.cfg, self.state)
        self.guard = Guard(self.cfg, self.keys, self.state, self.ratelimit)
        self.sessions: SessionStore | None = None  # opened in boot(): LMDB after fork
        self.events: PartitionOwner | None = None  # this worker's event-log partition, opened in boot()
        self._event_stats: dict = {}
        self.mesh: Mesh | None = None
        self.router = Router()
        self.http = HttpServer(self.cfg["limits"], self.router.dispatch, self.metrics, log, self.cfg["log"]["access"],
                               routes=self.router.exact)
        self.http.on_count_change = self._on_count_change
        self.ws = WsHub(self.cfg["websocket"], self.loop, log, server=self.http)  # the WebSocket sessions
        self.http.max_connections = self.conn_cap = self.cfg["server"]["max_connections"]
        self.fds_own = None  # descriptors held besides connections (_fd_cap)
        self.servers: list = []
        self.accepting = False
        self.link: SupervisorLink | None = None
        self.stopped = asyncio.Event()
        self.supervisor_pid = spec["supervisor_pid"]
        self.booted = False
        self.draining = False  # SIGTERM seen (a RELEASE also ends keep-alives, but is not a drain)
        self.periodic: list[asyncio.Task] = []  # cancelled before the sockets close
        self.infer: dict = {}  # model name -> WorkerClient
        self.embedder = self.semantic = None  # the semantic cache's embedder process, when on
        self.hydrator = self.remote = self.model_worker = None  # feature sources, when views or models are declared
        self.predictors: dict = {}
        self.breakers: dict = {}  # downstream -> Breaker, for /metrics and `tidegate admin breakers`
        self.pressure = self.shedder = None  # downstream pressure and the shed policy, set in _routes
        self.box: set = set()  # box-level overload actions on now (the supervisor's BOX)

    # ---- routes -------------------------------------------------------------------------------
    def _routes(self) -> None:
        cfg, r, guard = self.cfg, self.router, self.guard
        gen = self.spec["gen"]
        downstreams = {m["name"]: endpoints.pressure(cfg, "inference", m["name"], gen) for m in config.local_models(cfg)}
        if any(m.get("worker") for m in cfg["predict"]["models"]):
            downstreams["models"] = endpoints.pressure(cfg, "models", "", gen)
        self.pressure = PressureView(self.zmq, self.loop, downstreams)
        ov = cfg["overload"]
        lag = LoopLag(self.loop, ov["loop_lag"], ov["loop_lag_share"]) if ov["loop_lag"] else None
        self.shedder = Shedder(cfg, self.pressure, lag)
        classes = Classes(cfg)
        routes = [OpsRoutes(cfg, self.link, self.snapshot), SessionRoutes(cfg, guard)]
        if cfg["events"]["enabled"]:
            routes += [EventRoutes(cfg, self.owners), ViewRoutes(self.views)]
        if cfg["features"]["views"] or cfg["predict"]["models"]:
            self._hydration()
            routes.append(FeatureRoutes(self.hydrator, cfg["predict"]))
        predictors = self._predictors() if cfg["predict"]["models"] else {}
        if predictors:
            routes.append(PredictRoutes(cfg, predictors, self.shedder, classes))
        models = config.models(cfg)
        self.http.early = EarlyShed(self.keys, classes, self.shedder, models, predictors)
        self.http.early_bytes = cfg["overload"]["early_bytes"]
        if models:
            limit = cfg["server"]["max_frame_bytes"]
            self.infer = {m["name"]: RemoteModel(m, cfg, self.loop) if m.get("backends") else
                          WorkerClient(self.zmq, endpoints.worker(cfg, "inference", m["name"], self.spec["gen"]),
                                       self.loop, limit) for m in models}
            if config.semantic_enabled(cfg):
                self.embedder = WorkerClient(self.zmq, endpoints.worker(cfg, "embedder", "", self.spec["gen"]),
                                             self.loop, limit)
                self.semantic = SemanticClient(cfg, self.embedder)
                self.breakers["embedder"] = self.semantic.breaker
            for m in models:
                self.breakers[f"inference:{m['name']}"] = Breaker.from_config(cfg["breakers"], slow_call=1e9)
                for b in getattr(self.infer[m["name"]], "backends", ()):  # a remote model: one breaker per backend
                    self.breakers[f"backend:{m['name']}:{b.url}"] = b.breaker
            api = OpenAIRoutes(cfg, models, self.infer, self.ratelimit, self.exact, self.semantic,
                               self.shedder, self.breakers, classes)
            routes += [api, ResponsesRoute(api)]
        routes.append(WsRoutes(cfg, self.ws, r))
        for group in routes:
            group.add_to(r, guard)

    def _hydration(self) -> None:
        """The feature sources, read-only here: the registry, the event views, Redis when a view uses it."""
        fc = self.cfg["features"]
        registry = Registry(os.path.join(self.cfg["server"]["data_dir"], "features"), fc["views"])
        remote = {n: v for n, v in registry.views.items() if v.source == "redis"}
        self.remote = RedisSource(fc, remote, self.cfg["breakers"]) if remote else None
        if self.remote is not None:
            self.breakers["redis"] = self.remote.breaker
        self.hydrator = Hydrator(registry, self.views if self.cfg["events"]["enabled"] else None, self.remote,
                                 fc["deadline"])

    def _predictors(self) -> dict:
        """One Predictor per tabular model: scored inline, or in the model worker (worker = true)."""
        cfg, out = self.cfg, {}
        if any(m.get("worker") for m in cfg["predict"]["models"]):
            self.model_worker = WorkerClient(self.zmq, endpoints.worker(cfg, "models", "", self.spec["gen"]),
                                             self.loop, cfg["server"]["max_frame_bytes"])
        for m in cfg["predict"]["models"]:
            plan = plan_for(m, cfg)
            if m.get("worker"):
                score, version = self._remote_scorer(m["name"]), version_of(m["path"], m.get("version", ""))
            else:
                model = Model(m["path"], m.get("version", ""))
                check_inputs(model, plan, m["name"])
                score, version = (lambda X, cls, predict=model.predict: predict(X)), model.version
            out[m["name"]] = Predictor(m, plan, self.hydrator, score, version, self.loop, cfg["predict"],
                                       last_served=self.exact)
        self.predictors = out
        return out

    def _remote_scorer(self, name: str):
        client, timeout = self.model_worker, self.cfg["predict"]["worker_timeout"]
        breaker = self.breakers[f"models:{name}"] = Breaker.from_config(self.cfg["breakers"])

        def score(X, cls):
            fut = self.loop.create_future()
            if not breaker.allow():
                raise ModelError([503, f"the model worker's circuit breaker for {name!r} is open", "circuit_open",
                                  None])
            t0 = self.loop.time()

            def on_event(kind, payload):
                timer.cancel()
                if fut.done():
                    return
                if kind == protocol.SCORES:
                    breaker.record(True, self.loop.time() - t0)
                    fut.set_result(np.asarray(payload, dtype=np.float32))
                else:  # a full queue there is load (shedding's business), not a failure
                    breaker.record(isinstance(payload, list) and len(payload) > 2 and payload[2] == "queue_full")
                    fut.set_exception(ModelError(payload))

            def late():
                client.cancel(rid)
                if not fut.done():
                    breaker.record(False)
                    fut.set_exception(ModelError([504, f"the model worker did not score {name!r} within "
                                                  f"{timeout}s (predict.worker_timeout)", "model_timeout", None]))
            try:
                rid = client.submit(protocol.SCORE, {"model": name, "rows": X.tolist(), "cls": cls,
                                                          "t": time.monotonic()}, on_event)
            except Unavailable as e:
                breaker.record(False)
                raise ModelError([503, str(e), "worker_unavailable", None]) from None
            timer = self.loop.call_later(timeout, late)
            return fut
        return score

    # ---- lifecycle ----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        m, h = self.metrics, self.http  # byte and connection counters are kept in C by the server
        m.open_connections, m.bytes_in, m.bytes_out, m.connections_accepted = (
            len(h.conns), h.bytes_in, h.bytes_out, h.connections_accepted)
        rl = self.ratelimit.stats
        m.extra = {"connections_evicted": h.evicted, "ratelimit_admitted": rl["admitted"], "ratelimit_limited": rl["limited"],
                   "owner_unavailable": self.owners.stats["owner_unavailable"], "ratelimit_leased": rl["leased"],
                   "ratelimit_buckets": len(self.ratelimit.table),
                   "sessions_live": len(self.sessions.live) if self.sessions else 0}
        m.extra.update(self.ws.stats, ws_open=len(self.ws.sessions))
        m.bytes_in += self.ws.bytes_in
        m.bytes_out += self.ws.bytes_out
        remote = [b.stats for c in self.infer.values() for b in getattr(c, "backends", ())]
        if remote:
            m.extra.update({f"remote_{k}": sum(st[k] for st in remote) for k in remote[0]})
        if self.state is not self.owners:
            st = self.state.stats
            m.extra["owner_unavailable"] += st["owner_unavailable"]
            m.extra.update(state_cluster_calls=st["cluster_calls"], state_cluster_errors=st["cluster_errors"])
        if self.events:
            self._event_stats = self.events.stats  # kept while released, so counters never go back
        m.extra.update(self._event_stats)
        xs = self.exact.store
        m.extra.update(exact_hits=xs.stats["hits"], exact_misses=xs.stats["misses"], exact_inserts=xs.stats["inserts"],
                       exact_evictions=xs.stats["evictions"], exact_bytes=xs.bytes)
        if self.semantic:
            m.extra.update(self.semantic.stats)
        if self.predictors:
            stats = [p.stats for p in self.predictors.values()]
            m.extra.update(predict_batches=sum(s["batches"] for s in stats), predict_requests=sum(s["items"] for s in stats),
                           predict_defaulted=sum(s["defaulted"] for s in stats))
        if self.remote is not None:
            m.extra.update(self.remote.stats, redis_breaker_opened=self.remote.breaker.stats["opened"])
        if self.shedder is not None:
            m.extra.update(self.shedder.stats)
        if self.mesh:
            ms = self.mesh.stats
            m.extra.update(mesh_frames_sent=ms["frames_out"], mesh_messages_sent=ms["messages_out"],
                           mesh_expired=ms["expired"])
        m.extra["breakers_open"] = sum(b.state != "closed" for b in self.breakers.values())
        m.extra["breakers_opened"] = sum(b.stats["opened"] for b in self.breakers.values())
        snap = self.metrics.snapshot()
        snap["breakers"] = {name: b.describe() for name, b in self.breakers.items()}
        return snap

    async def _purge_cluster(self, tenant: str | None) -> None:
        try:
            n = await self.state.purge(tenant)
            log.info("exact cache purged in the state cluster", tenant=tenant or "(all)", entries=n)
        except Exception as e:
            log.warning("exact cache purge in the state cluster failed", tenant=tenant or "(all)", error=repr(e))

    def _on_command(self, msg: dict) -> None:
        op = msg["op"]
        if op == protocol.PURGE:
            n = self.exact.store.purge(msg.get("tenant"))
            log.info("exact cache purged", tenant=msg.get("tenant") or "(all)", entries=n)
            if self.state is not self.owners and self.slot == 0:  # the shared entries: one worker asks
                asyncio.ensure_future(self._purge_cluster(msg.get("tenant")))
        elif op == protocol.RELEASE:
            self._release(msg["gen"])
        elif op == protocol.RESUME:
            asyncio.ensure_future(self._resume())
        elif op == protocol.SHED:
            self.shedder.forced = set(msg.get("classes", ()))
            log.info("forced shedding", classes=", ".join(sorted(self.shedder.forced)) or "none")
        elif op == protocol.BOX:
            self._box_actions(set(msg.get("actions", ())))

    def _box_actions(self, actions: set) -> None:
        """The supervisor's box-level overload actions (core/overload/box.py): keep-alive off, shed
        all but critical, accepting paused; each undone when it goes off."""
        self.box = actions
        self.http.no_keepalive = "keepalive" in actions
        self.shedder.box = "shed" in actions
        if "accept" in actions and self.accepting:
            self._stop_accepting()
        elif "accept" not in actions and not self.accepting and not self.draining and \
                len(self.http.conns) + self.http.upgraded < self.conn_cap:
            asyncio.ensure_future(self._start_accepting())
            self.accepting = True  # now: a second BOX before it runs must not start a second server
        log.warning("box-level overload", actions=", ".join(sorted(actions)) or "none")

    # ---- durable stores: opened under their locks, handed over on reload ------------------------
    STORE_OPS = (protocol.SESS_CREATE, protocol.SESS_GET, protocol.SESS_PATCH, protocol.SESS_DELETE,
                 protocol.SESS_ADOPT, protocol.EV_APPEND)

    def _store_dirs(self) -> dict:
        data = self.cfg["server"]["data_dir"]
        dirs = {"sessions": os.path.join(data, f"sessions-{self.slot}")}
        if self.cfg["events"]["enabled"]:
            dirs["events"] = os.path.join(data, "events", f"p-{self.slot}")
        return dirs

    async def _open_stores(self, wait: float) -> None:
        """Take this slot's stores once the previous holder (the old generation, on a reload) has
        let go: poll their locks without blocking the loop, then open them. Owner calls for them
        that arrive meanwhile wait (Owners.hold) instead of failing."""
        dirs = self._store_dirs()
        locks = {name: StoreLock(d) for name, d in dirs.items()}
        deadline = time.monotonic() + wait
        while not all(lock.try_acquire() for lock in locks.values()):
            if time.monotonic() > deadline:
                for lock in locks.values():
                    lock.release()
                raise StoreLocked(f"slot {self.slot}'s stores are still held: "
                                  + ", ".join(f"{n} by {lk.holder()}" for n, lk in locks.items() if not lk.held))
            await asyncio.sleep(0.005)
        self.sessions = self._session_store(dirs["sessions"], locks["sessions"])
        handlers = self.sessions.handlers()
        if "events" in locks:
            self.events = PartitionOwner(self.cfg, self.slot, self.views, lock=locks["events"])
            handlers.update(self.events.handlers())
        self.owners.open(handlers)

    def _session_store(self, path: str, lock: StoreLock, max_sessions: int | None = None) -> SessionStore:
        sc = self.cfg["sessions"]
        return SessionStore(path, sc["ttl"], max_sessions or sc["max_per_worker"], sc["map_bytes"],
                            sc["max_attributes_bytes"], lock=lock)

    def _close_stores(self) -> None:
        """Flush, fsync and close the stores, then let go of their locks (idempotent)."""
        self.owners.hold(self.STORE_OPS)
        if self.events is not None:
            self.events.close()
            self.events = None
        if self.sessions is not None:
            self.sessions.close()
            self.sessions = None

    async def _rehome_sessions(self) -> None:
        """After the worker count changed, sessions sit at their old owner: hand each to its owner
        on the new ring (sess.adopt), then drop it here. Slot 0 also empties the stores of slots
        that no longer exist. Until a session is moved its token answers 401; a failure leaves it
        for the next start. Nothing is scanned while the worker count stays what it was."""
        data = self.cfg["server"]["data_dir"]
        mark = os.path.join(self._store_dirs()["sessions"], "ring")  # the worker count the store was sorted for
        try:
            with open(mark) as f:
                if f.read().strip() == str(self.n_slots):
                    return
        except OSError:
            pass
        stores, complete = [(self.sessions, False)], True
        if self.slot == 0:
            for path in sorted(glob.glob(os.path.join(data, "sessions-*"))):
                j = path.rsplit("-", 1)[1]
                if j.isdigit() and int(j) >= self.n_slots:
                    try:
                        lock = StoreLock(path).acquire(wait=30.0)  # its old owner lets go on its way out
                        stores.append((self._session_store(path, lock, max_sessions=1 << 62), True))
                    except (OSError, lmdb.Error) as e:
                        complete = False
                        log.warning("sessions of a removed slot not moved yet", store=path, error=str(e))
        moved = 0
        for store, foreign in stores:
            for i, (sid, rec) in enumerate(list(store.live.items())):
                if i % 1000 == 999:
                    await asyncio.sleep(0)  # a big store: keep serving meanwhile
                owner = self.owners.owner_of(sid.encode())
                if not foreign and owner == self.slot:
                    continue
                try:
                    ok = self.owners.call(owner, protocol.SESS_ADOPT, {"sid": sid, "rec": rec}, 5.0)
                    if asyncio.isfuture(ok):
                        ok = await ok
                except Exception as e:
                    complete = False
                    log.warning("session not moved yet", error=repr(e))
                    break
                if ok:
                    store.delete(sid)
                    moved += 1
                await asyncio.sleep(0)
            if foreign:
                store.close()
        if moved:
            log.info("sessions moved to their owners on the new ring", moved=moved)
        if complete and self.sessions is not None:
            with open(mark, "w") as f:
                f.write(str(self.n_slots))

    def _release(self, gen: int) -> None:
        """Reload hand-off: generation `gen` is up to its stores. Stop accepting (new connections
        wait in the shared backlog), end idle keep-alives, close the stores, and send every owner
        call still made here (requests in flight) to generation gen: no error, a short wait."""
        log.info("releasing stores to the next generation", slot=self.slot, gen=gen)
        self._stop_accepting()
        self.http.drain()
        self.ws.drain()  # sockets close with 1001 after their replies: clients reconnect to gen
        self._close_stores()
        forward = Mesh(-1, self.n_slots, self.cfg["server"]["run_dir"], {}, self.cfg["server"]["max_frame_bytes"],
                       ctx=self.zmq, gen=gen, bind=False)
        forward.start()
        self.owners.redirect(forward, self.STORE_OPS)
        self.link.send(protocol.RELEASED)

    async def _resume(self) -> None:
        """The reload failed after the release: take the stores back and serve again."""
        log.warning("reload failed: resuming with the stores", slot=self.slot)
        self.owners.restore(self.STORE_OPS)
        await self._open_stores(self.cfg["server"]["boot_timeout"])
        self.http.draining = self.ws.draining = False
        await self._start_accepting()

    async def boot(self) -> None:
        if "ingress.boot" in FAILPOINTS:
            raise RuntimeError("failpoint ingress.boot")
        srv = self.cfg["server"]
        self.zmq = zmq.Context()  # one per worker, shared by the supervisor link and the mesh
        self.link = SupervisorLink(self.zmq, self.spec["internal"], self.spec["id"],
                                   self.cfg["server"]["max_frame_bytes"])
        self.link.start()
        self.link.on_command = self._on_command
        self.views = ViewReader(srv["data_dir"], self.cfg["events"]["views"])  # read-only: no lock
        self.owners.hold(self.STORE_OPS)  # answered once the stores are open
        self._routes()
        # a mesh even with one worker: a released predecessor forwards in-flight calls to it
        self.mesh = Mesh(self.slot, self.n_slots, srv["run_dir"], self.owners.handlers,
                         self.cfg["server"]["max_frame_bytes"], ctx=self.zmq, gen=self.spec["gen"])
        self.mesh.start()
        self.owners.attach(self.mesh)
        if self.state is not self.owners:
            if not await self.state.start(min(2.0, srv["boot_timeout"])):
                log.warning("state cluster not reachable yet: its calls answer 503 (or fail open) until it is",
                            seeds=",".join(self.cfg["state"]["seeds"]), error=self.state.last_error)
        if self.n_slots > 1 or self.state is not self.owners:
            self._spawn_periodic(self.ratelimit.sweep_leases, self.cfg["ratelimit"]["lease_ttl"])
        self.link.send(protocol.STANDBY)  # on a reload the old generation now lets go of the stores
        await self._open_stores(srv["boot_timeout"])
        self.listen_socks = [socket.socket(fileno=fd) for fd in self.spec["fds"]]
        self._fd_cap()
        await self._start_accepting()
        self.loop.add_signal_handler(signal.SIGTERM, self.drain)
        self.loop.add_signal_handler(signal.SIGQUIT, self.stopped.set)
        self.link.send(protocol.READY, pid=os.getpid())
        self._spawn_periodic(self._heartbeat, srv["heartbeat_interval"])
        self._spawn_periodic(self.http.tick, 1.0)
        self._spawn_periodic(self.ws.tick, 1.0)
        self._spawn_periodic(self._fd_cap, 5.0)
        if self.remote is not None:
            asyncio.ensure_future(self.remote.warm())
        self._spawn_periodic(lambda: self.sessions and self.sessions.expire(), 60.0)
        self._spawn_periodic(self.ratelimit.table.reclaim, 60.0)
        if self.cfg["events"]["enabled"]:
            self._spawn_periodic(lambda: self.events and self.events.retain(), 5.0)
            self._spawn_periodic(lambda: self.events and self.events.probe(), 1.0)
        self.booted = True
        gc.collect()
        gc.freeze()  # what boot built lives as long as the worker: full collections need not scan it
        log.info("worker ready", slot=self.slot, gen=self.spec["gen"])
        self.periodic.append(asyncio.ensure_future(self._rehome_sessions()))

    def _spawn_periodic(self, fn, interval: float) -> None:
        async def run():
            while not self.stopped.is_set():
                await asyncio.sleep(interval)
                if not self.stopped.is_set():  # woken after the stop: the sockets may be closed
                    try:
                        fn()
                    except Exception as e:  # one bad run must not end the task for good
                        log.error("periodic task failed", task=getattr(fn, "__qualname__", repr(fn)), error=repr(e))
        self.periodic.append(asyncio.ensure_future(run()))

    def _heartbeat(self) -> None:
        if os.getppid() != self.supervisor_pid:
            log.error("supervisor is gone; exiting")
            self.stopped.set()
            return
        self.link.send(protocol.HEARTBEAT, snap=self.snapshot())

    async def _start_accepting(self) -> None:
        # Each server gets a dup of the inherited socket so closing it (to pause) leaves ours open.
        self.accepting = True
        for s in self.listen_socks:
            dup = socket.socket(fileno=os.dup(s.fileno()))
            self.servers.append(await self.loop.create_server(
                lambda: HttpConnection(self.http), sock=dup, backlog=self.cfg["server"]["backlog"]))

    def _stop_accepting(self) -> None:
        self.accepting = False
        for server in self.servers:
            server.close()
        self.servers = []

    def _fd_cap(self) -> None:
        """The connection cap: max_connections, or less where the open-files limit is nearer.
        What the worker holds besides its connections (sockets, stores, pipes: nearly constant)
        is counted again only while it has few connections: listing /proc/self/fd costs about
        1 ms a thousand descriptors, a stall of 19 ms at 18,000 (fd_reserve covers the drift)."""
        conns = len(self.http.conns) + self.http.upgraded
        if self.fds_own is None or conns < 2000:
            fds = open_fds()
            self.fds_own = None if fds is None else fds - conns
        cap = connection_cap(self.cfg["server"]["max_connections"], self.fds_own, self.cfg["server"]["fd_reserve"])
        if cap < self.cfg["server"]["max_connections"] == self.conn_cap:
            log.info("connection cap set by the open-files limit", cap=cap, own_files=self.fds_own,
                     max_connections=self.cfg["server"]["max_connections"])
        self.conn_cap = self.http.max_connections = cap

    def _on_count_change(self, n: int, new) -> None:
        """Over the connection cap (max_connections, or the open-files limit's) a new connection
        evicts an idle or slow one (so a normal client still gets in during a slowloris); only
        when every connection is busy does accepting pause: new ones wait in the backlog."""
        limit = self.conn_cap
        if new is None or n < limit:
            if not self.accepting and not self.http.draining and n <= limit * 9 // 10 and "accept" not in self.box:
                log.info("accepting again", open=n)
                asyncio.ensure_future(self._start_accepting())
                self.accepting = True
            return
        if n == limit and self.http.evictable(new):
            return  # full, but the next connection can take an idle or slow one's place
        if n > limit and self.http.evict(new, max(1, limit // 20)):  # a batch: the next ones find room at once
            return
        if self.accepting:  # every connection is busy: new ones wait in the kernel backlog
            log.warning("connection cap reached; not accepting", open=n, cap=limit)
            self._stop_accepting()

    def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("draining", open=len(self.http.conns))
        self._stop_accepting()
        for s in self.listen_socks:  # the last copies: the port now refuses instead of queueing
            s.close()
        self.http.drain()
        self.ws.drain()  # each socket closes with 1001 once its replies are done
        asyncio.ensure_future(self._finish_drain())

    async def _finish_drain(self) -> None:
        deadline = time.monotonic() + self.cfg["server"]["graceful_timeout"]
        while (self.http.conns or self.ws.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.http.conns or self.ws.sessions:
            log.warning("graceful timeout: closing connections", open=len(self.http.conns),
                        websockets=len(self.ws.sessions))
            self.ws.close_all()
        self.link.send(protocol.HEARTBEAT, snap=self.snapshot())  # final counters
        await asyncio.sleep(0.05)
        self.stopped.set()

    async def run(self) -> None:
        await self.boot()
        await self.stopped.wait()
        for task in self.periodic:
            task.cancel()
        for conn in list(self.http.conns):
            conn.abort("worker stopping")
        self.ws.close_all("worker stopping")
        self.owners.restore(())  # closes a forwarding mesh left from a RELEASE
        if self.mesh:
            self.mesh.close()
        for client in [*self.infer.values(), *(c for c in (self.embedder, self.model_worker) if c)]:
            client.close()
        if self.remote is not None:
            await self.remote.close()
        self._close_stores()
        if self.state is not self.owners:
            await self.state.close()
        if self.pressure is not None:
            self.pressure.close()
        if self.shedder is not None and self.shedder.lag is not None:
            self.shedder.lag.close()
        self.link.close()
        self.zmq.term()


def main() -> None:
    spec = start_worker(lambda spec: f"ingress {spec['slot']}")
    worker = None

    async def start():
        nonlocal worker
        worker = IngressWorker(spec)
        await worker.run()

    try:
        uvloop.run(start())
    except Exception as e:
        if worker is None or not worker.booted:
            log.error("worker failed to boot", error=repr(e))
            sys.exit(WORKER_BOOT_ERROR)
        log.error("worker crashed", error=repr(e))
        sys.exit(1)


if __name__ == "__main__":
    main()
