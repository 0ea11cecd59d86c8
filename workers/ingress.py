"""Ingress worker process: one single-threaded uvloop (epoll) event loop serving HTTP.

Started by the supervisor with its listening sockets inherited (one SO_REUSEPORT socket per
slot and address, kept open by the supervisor so a replaced worker's queue is never dropped)
and its spec in $TIDEGATE_WORKER_SPEC. It reports READY once it accepts, heartbeats with a
metrics snapshot, drains on SIGTERM, exits at once on SIGQUIT and ignores SIGINT (the
supervisor decides). Exit codes: 0 clean, 3 failed to boot (the supervisor then halts).
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

import uvloop
import zmq

from tidegate.core import config, protocol
from tidegate.core.auth import ApiKeys
from tidegate.core.http11 import HttpError, HttpServer, Response, json_response
from tidegate.core.event_routes import EventService
from tidegate.core.exact_cache import ExactCache
from tidegate.core.worker_client import WorkerClient
from tidegate.core.jsonbody import parse_json
from tidegate.core.jsonlog import log
from tidegate.core.link import SupervisorLink
from tidegate.core.mesh import Mesh
from tidegate.core.metrics import WorkerMetrics
from tidegate.core.openai_api import OpenAIRoutes
from tidegate.core.process import EXIT_BOOT_ERROR, start_worker
from tidegate.core.ratelimit import RateLimiter
from tidegate.core.ring import HashRing
from tidegate.core.router import Router
from tidegate.core.semantic_client import SemanticCache
from tidegate.core.session_routes import SessionService
from tidegate.core.sessions import SessionStore
from tidegate.ext.httpconn import HttpConnection

FAILPOINTS = frozenset(os.environ.get("TIDEGATE_FAILPOINTS", "").split(","))  # fault injection for tests

_HEALTHZ = Response(200, b'{"status":"ok"}')
_PROM_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class IngressWorker:
    def __init__(self, spec: dict):
        self.spec = spec
        self.cfg = spec["config"]
        self.slot = spec["slot"]
        self.loop = asyncio.get_running_loop()
        self.metrics = WorkerMetrics()
        self.n_slots = spec["n_slots"]
        self.ring = HashRing(range(self.n_slots))
        self.keys = ApiKeys(self.cfg["auth"]["keys"])
        self.ratelimit = RateLimiter(self.cfg, self.slot, self.ring)
        self.exact = ExactCache(self.cfg, self.slot, self.ring)
        self.sessions: SessionService | None = None  # opened in boot(): LMDB after fork
        self.mesh: Mesh | None = None
        self.router = Router()
        self.http = HttpServer(self.cfg["limits"], self.router.dispatch, self.metrics, self.cfg["log"]["access"],
                               routes=self.router.exact)
        self.http.on_count_change = self._on_count_change
        self.servers: list = []
        self.accepting = False
        self.link: SupervisorLink | None = None
        self.stopped = asyncio.Event()
        self.supervisor_pid = spec["supervisor_pid"]
        self.booted = False
        self.periodic: list[asyncio.Task] = []  # cancelled before the sockets close
        self.infer: dict = {}  # model name -> WorkerClient
        self.embedder = self.semantic = None  # the semantic cache's embedder process, when on
        self.events = None  # EventService: this worker's event-log partition

    # ---- routes -------------------------------------------------------------------------------
    def _routes(self) -> None:
        r, api = self.router, self.sessions.guard
        r.add("GET", "/healthz", lambda req: _HEALTHZ)
        r.add("GET", "/readyz", self.readyz)
        r.add("GET", "/metrics", self.metrics_route)
        r.add("POST", "/v1/echo", api(self.echo))
        r.add("POST", "/v1/sessions", api(self.sessions.create))
        r.add("GET", "/v1/sessions/current", api(self.sessions.current, session_only=True))
        r.add("PATCH", "/v1/sessions/current", api(self.sessions.patch, session_only=True))
        r.add("DELETE", "/v1/sessions/current", api(self.sessions.delete, session_only=True))
        if self.events:
            r.add("POST", "/v1/events", api(self.events.ingest))
            view = api(self.events.view)
            r.add("GET", "/v1/views/{view}/{key}", lambda req, **_: view(req))
        models = config.models(self.cfg)
        if models:
            self.infer = {m["name"]: WorkerClient(self.zmq, config.inference_endpoint(self.cfg, m["name"], self.spec["gen"]),
                                                 self.loop,
                                                 self.cfg["control"]["max_message_bytes"]) for m in models}
            if config.semantic_enabled(self.cfg):
                self.embedder = WorkerClient(self.zmq, config.embedder_endpoint(self.cfg, self.spec["gen"]), self.loop,
                                            self.cfg["control"]["max_message_bytes"])
                self.semantic = SemanticCache(self.cfg, self.embedder)
            OpenAIRoutes(self.cfg, models, self.infer, self.ratelimit, self.exact, self.semantic).add_to(r, api)

    def echo(self, req) -> Response:
        """Parse a JSON body under the configured limits and send it back: a connectivity probe."""
        return json_response({"object": "echo", "data": parse_json(req, self.cfg["limits"])})

    async def readyz(self, req) -> Response:
        ans = await self._ask(protocol.READINESS)
        return json_response(ans["body"], 200 if ans["body"]["ready"] else 503)

    async def metrics_route(self, req) -> Response:
        ans = await self._ask(protocol.METRICS, snap=self.snapshot())
        return Response(200, ans["body"].encode(), _PROM_TYPE)

    async def _ask(self, op: str, **fields) -> dict:
        try:
            return await self.link.request(op, timeout=2.0, **fields)
        except asyncio.TimeoutError:
            raise HttpError(503, "supervisor did not answer in time", "supervisor_timeout",
                            headers=[(b"retry-after", b"1")]) from None

    # ---- lifecycle ----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        m, h = self.metrics, self.http  # byte and connection counters are kept in C by the server
        m.open_connections, m.bytes_in, m.bytes_out, m.connections_accepted = (
            len(h.conns), h.bytes_in, h.bytes_out, h.connections_accepted)
        rl = self.ratelimit.stats
        m.extra = {"ratelimit_admitted": rl["admitted"], "ratelimit_limited": rl["limited"],
                   "owner_unavailable": rl["owner_unavailable"], "ratelimit_leased": rl["leased"],
                   "ratelimit_buckets": len(self.ratelimit.table),
                   "sessions_live": len(self.sessions.store.live) if self.sessions else 0}
        if self.events and self.events.partition:
            m.extra.update(self.events.partition.stats)
        xs = self.exact.store
        m.extra.update(exact_hits=xs.stats["hits"], exact_misses=xs.stats["misses"], exact_inserts=xs.stats["inserts"],
                       exact_evictions=xs.stats["evictions"], exact_bytes=xs.bytes)
        if self.semantic:
            m.extra.update(self.semantic.stats)
        if self.mesh:
            ms = self.mesh.stats
            m.extra.update(mesh_frames_sent=ms["frames_out"], mesh_messages_sent=ms["messages_out"],
                           mesh_expired=ms["expired"])
        return self.metrics.snapshot()

    def _on_command(self, msg: dict) -> None:
        if msg["op"] == protocol.PURGE:
            n = self.exact.store.purge(msg.get("tenant"))
            log.info("exact cache purged", tenant=msg.get("tenant") or "(all)", entries=n)

    async def boot(self) -> None:
        if "ingress.boot" in FAILPOINTS:
            raise RuntimeError("failpoint ingress.boot")
        srv = self.cfg["server"]
        self.zmq = zmq.Context()  # one per worker, shared by the supervisor link and the mesh
        self.link = SupervisorLink(self.zmq, self.spec["internal"], self.spec["id"],
                                   self.cfg["control"]["max_message_bytes"])
        self.link.start()
        self.link.on_command = self._on_command
        store = SessionStore(os.path.join(srv["data_dir"], f"sessions-{self.slot}"), self.cfg["sessions"]["ttl"],
                             self.cfg["sessions"]["max_per_worker"])
        self.sessions = SessionService(self.cfg, self.slot, self.ring, self.keys, self.ratelimit, store)
        if self.cfg["events"]["enabled"]:
            self.events = EventService(self.cfg, self.slot, self.ring)  # the partition: opened after fork
        self._routes()
        if self.n_slots > 1:
            self.mesh = Mesh(self.slot, self.n_slots, srv["run_dir"],
                             {**self.ratelimit.handlers(), **self.sessions.handlers(), **self.exact.handlers(),
                              **(self.events.handlers() if self.events else {})},
                             self.cfg["control"]["max_message_bytes"], ctx=self.zmq)
            self.mesh.start()
            self.ratelimit.mesh = self.sessions.mesh = self.exact.mesh = self.mesh
            if self.events:
                self.events.mesh = self.mesh
            self._spawn_periodic(self.ratelimit.sweep_leases, self.cfg["ratelimit"]["lease_ttl"])
        self.listen_socks = [socket.socket(fileno=fd) for fd in self.spec["fds"]]
        await self._start_accepting()
        self.loop.add_signal_handler(signal.SIGTERM, self.drain)
        self.loop.add_signal_handler(signal.SIGQUIT, self.stopped.set)
        self.link.send(protocol.READY, pid=os.getpid())
        self._spawn_periodic(self._heartbeat, srv["heartbeat_interval"])
        self._spawn_periodic(self.http.tick, 1.0)
        self._spawn_periodic(self.sessions.store.expire, 60.0)
        self._spawn_periodic(self.ratelimit.table.reclaim, 60.0)
        if self.events:
            self._spawn_periodic(self.events.retain, 5.0)
            self._spawn_periodic(self.events.probe, 1.0)
        self.booted = True
        log.info("worker ready", slot=self.slot, gen=self.spec["gen"])

    def _spawn_periodic(self, fn, interval: float) -> None:
        async def run():
            while not self.stopped.is_set():
                await asyncio.sleep(interval)
                if not self.stopped.is_set():  # woken after the stop: the sockets may be closed
                    fn()
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

    def _on_count_change(self, n: int) -> None:
        limit = self.cfg["server"]["max_connections"]
        if self.accepting and n >= limit:
            log.warning("max_connections reached; not accepting", open=n)
            self._stop_accepting()
        elif not self.accepting and not self.http.draining and n <= limit * 9 // 10:
            log.info("accepting again", open=n)
            asyncio.ensure_future(self._start_accepting())
            self.accepting = True

    def drain(self) -> None:
        if self.http.draining:
            return
        log.info("draining", open=len(self.http.conns))
        self._stop_accepting()
        for s in self.listen_socks:  # the last copies: the port now refuses instead of queueing
            s.close()
        self.http.drain()
        asyncio.ensure_future(self._finish_drain())

    async def _finish_drain(self) -> None:
        deadline = time.monotonic() + self.cfg["server"]["graceful_timeout"]
        while self.http.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.http.conns:
            log.warning("graceful timeout: closing connections", open=len(self.http.conns))
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
        if self.mesh:
            self.mesh.close()
        for client in [*self.infer.values(), *([self.embedder] if self.embedder else [])]:
            client.close()
        self.sessions.store.close()
        if self.events and self.events.partition:
            self.events.partition.close()
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
            sys.exit(EXIT_BOOT_ERROR)
        log.error("worker crashed", error=repr(e))
        sys.exit(1)


if __name__ == "__main__":
    main()
