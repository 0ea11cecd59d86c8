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
import os
import signal
import sys
import time

import uvloop
import zmq

from tidegate.core.base.jsonlog import log
from tidegate.core.base.metrics import WorkerMetrics
from tidegate.core.events.views import ViewReader
from tidegate.core.http.http11 import HttpServer
from tidegate.core.http.router import Router
from tidegate.core.messaging import protocol
from tidegate.core.messaging.link import SupervisorLink
from tidegate.core.messaging.mesh import Mesh
from tidegate.core.runtime.process import WORKER_BOOT_ERROR, start_worker
from tidegate.core.state.owners import Owners
from tidegate.core.state.ring import HashRing
from tidegate.workers.ingress import services
from tidegate.workers.ingress.accept import Acceptor
from tidegate.workers.ingress.stores import Stores

FAILPOINTS = frozenset(os.environ.get("TIDEGATE_FAILPOINTS", "").split(","))  # fault injection for tests


class IngressWorker:
    """The composition root: boot wires the parts (services.build, Stores, Acceptor, the mesh)
    in order; the rest is lifecycle (commands, heartbeats, drain, stop)."""

    def __init__(self, spec: dict):
        self.spec, self.cfg = spec, spec["config"]
        self.slot, self.n_slots = spec["slot"], spec["n_slots"]
        self.loop = asyncio.get_running_loop()
        self.metrics = WorkerMetrics()
        # this box's ring owners: every piece of per-key state registers its owner-side ops here
        self.owners = Owners(self.slot, HashRing(range(self.n_slots)))
        self.router = Router()
        self.http = HttpServer(self.cfg["limits"], self.router.dispatch, self.metrics, log, self.cfg["log"]["access"],
                               routes=self.router.exact)
        self.accept = Acceptor(self.cfg["server"], self.http, self.loop)
        self.stopped = asyncio.Event()
        self.booted = False
        self.draining = False  # SIGTERM seen (a RELEASE also ends keep-alives, but is not a drain)
        self.box: set = set()  # the box-level overload actions on now (the supervisor's BOX)
        self.periodic: list[asyncio.Task] = []  # cancelled before the sockets close
        # made in boot(), in this order (each needs the one before)
        self.zmq: zmq.Context | None = None
        self.link: SupervisorLink | None = None
        self.stores: Stores | None = None
        self.services: services.Services | None = None
        self.mesh: Mesh | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    async def boot(self) -> None:
        if "ingress.boot" in FAILPOINTS:
            raise RuntimeError("failpoint ingress.boot")
        srv = self.cfg["server"]
        self.zmq = zmq.Context()  # one per worker, shared by the supervisor link, the mesh and the clients
        self.link = SupervisorLink(self.zmq, self.spec["internal"], self.spec["id"], srv["max_frame_bytes"])
        self.link.start()
        self.link.on_command = self._on_command
        views = ViewReader(srv["data_dir"], self.cfg["events"]["views"])  # read-only: no lock
        self.stores = Stores(self.cfg, self.slot, self.n_slots, self.owners, views)
        self.stores.hold()  # store calls are answered once the stores are open
        self.services = sv = services.build(self.cfg, self.spec, self.loop, self.zmq, self.owners, views, self.http,
                                            self.router, self.link, self.snapshot)
        # a mesh even with one worker: a released predecessor forwards in-flight calls to it
        self.mesh = Mesh(self.slot, self.n_slots, srv["run_dir"], self.owners.handlers, srv["max_frame_bytes"],
                         ctx=self.zmq, gen=self.spec["gen"])
        self.mesh.start()
        self.owners.attach(self.mesh)
        if not await sv.state.start(min(2.0, srv["boot_timeout"])):
            log.warning("state cluster not reachable yet: its calls answer 503 (or fail open) until it is",
                        seeds=",".join(self.cfg["state"]["seeds"]), error=sv.state.last_error)
        if sv.state.shared:
            self._every(sv.ratelimit.sweep_leases, self.cfg["ratelimit"]["lease_ttl"])
        self.link.send(protocol.STANDBY)  # on a reload the old generation now lets go of the stores
        await self.stores.open(srv["boot_timeout"])
        await self.accept.start(self.spec["fds"])
        self.loop.add_signal_handler(signal.SIGTERM, self.drain)
        self.loop.add_signal_handler(signal.SIGQUIT, self.stopped.set)
        self.link.send(protocol.READY, pid=os.getpid())
        self._every(self._heartbeat, srv["heartbeat_interval"])
        self._every(self.http.tick, 1.0)
        self._every(sv.ws.tick, 1.0)
        self._every(self.accept.fd_cap, 5.0)
        if sv.feature_store is not None:
            asyncio.ensure_future(sv.feature_store.warm())
        self._every(self.stores.expire_sessions, 60.0)
        self._every(sv.ratelimit.reclaim, 60.0)
        if self.cfg["events"]["enabled"]:
            self._every(self.stores.retain_events, 5.0)
            self._every(self.stores.probe_events, 1.0)
        self.booted = True
        gc.collect()
        gc.freeze()  # what boot built lives as long as the worker: full collections need not scan it
        log.info("worker ready", slot=self.slot, gen=self.spec["gen"])
        self.periodic.append(asyncio.ensure_future(self.stores.rehome_sessions()))

    def _every(self, fn, interval: float) -> None:
        async def run():
            while not self.stopped.is_set():
                await asyncio.sleep(interval)
                if not self.stopped.is_set():  # woken after the stop: the sockets may be closed
                    try:
                        fn()
                    except Exception as e:  # one bad run must not end the task for good
                        log.error("periodic task failed", task=getattr(fn, "__qualname__", repr(fn)), error=repr(e))
        self.periodic.append(asyncio.ensure_future(run()))

    def snapshot(self) -> dict:
        """The heartbeat's metrics: the HTTP server's (kept in C), every part's counters()."""
        m, h, sv = self.metrics, self.http, self.services
        m.open_connections, m.connections_accepted = len(h.conns), h.connections_accepted
        m.bytes_in, m.bytes_out = h.bytes_in + sv.ws.bytes_in, h.bytes_out + sv.ws.bytes_out
        m.extra = sv.counters()
        m.extra.update(self.stores.counters(), connections_evicted=h.evicted)
        if self.mesh is not None:
            m.extra.update(self.mesh.counters())
        snap = m.snapshot()
        snap["breakers"] = {name: b.describe() for name, b in sv.breakers.items()}
        remote = {name: m.describe() for name, m in (sv.llm or {}).items() if hasattr(m, "describe")}
        if remote:
            snap["backends"] = remote
        return snap

    def _heartbeat(self) -> None:
        if os.getppid() != self.spec["supervisor_pid"]:
            log.error("supervisor is gone; exiting")
            self.stopped.set()
            return
        self.link.send(protocol.HEARTBEAT, snap=self.snapshot())

    # ---- the supervisor's commands ------------------------------------------------------------
    def _on_command(self, msg: dict) -> None:
        op, sv = msg["op"], self.services
        if op == protocol.PURGE:
            tenant = msg.get("tenant")
            log.info("exact cache purged", tenant=tenant or "(all)", entries=sv.exact.store.purge(tenant))
            if self.slot == 0:  # entries shared past this box (a state cluster): one worker asks
                asyncio.ensure_future(self._purge_shared(tenant))
        elif op == protocol.RELEASE:
            self._release(msg["gen"])
        elif op == protocol.RESUME:
            asyncio.ensure_future(self._resume())
        elif op == protocol.SHED:
            sv.shedder.forced = set(msg.get("classes", ()))
            log.info("forced shedding", classes=", ".join(sorted(sv.shedder.forced)) or "none")
        elif op == protocol.BOX:
            self._box_actions(set(msg.get("actions", ())))

    async def _purge_shared(self, tenant: str | None) -> None:
        try:
            n = await self.services.state.purge(tenant)
            if n:
                log.info("exact cache purged in the state cluster", tenant=tenant or "(all)", entries=n)
        except Exception as e:
            log.warning("exact cache purge in the state cluster failed", tenant=tenant or "(all)", error=repr(e))

    def _box_actions(self, actions: set) -> None:
        """The supervisor's box-level overload actions (core/overload/box.py): keep-alive off,
        what can be rebuilt dropped (once, as trim comes on), shed all but critical, accepting
        paused; each undone when it goes off."""
        if "trim" in actions and "trim" not in self.box:
            dropped = self.services.exact.store.purge(None)
            self.services.ratelimit.forget_plans()
            log.warning("memory pressure: dropped what can be rebuilt", exact_entries=dropped)
        self.box = actions
        self.http.no_keepalive = "keepalive" in actions
        self.services.shedder.box = "shed" in actions
        self.accept.box("accept" in actions)
        log.warning("box-level overload", actions=", ".join(sorted(actions)) or "none")

    def _release(self, gen: int) -> None:
        """Reload hand-off: generation `gen` is up to its stores. Stop accepting (new connections
        wait in the shared backlog), end idle keep-alives, hand the stores over."""
        log.info("releasing stores to the next generation", slot=self.slot, gen=gen)
        self.accept.release()
        self.http.drain()
        self.services.ws.drain()  # sockets close with 1001 after their replies: clients reconnect to gen
        self.stores.release(gen, self.zmq)
        self.link.send(protocol.RELEASED)

    async def _resume(self) -> None:
        """The reload failed after the release: take the stores back and serve again."""
        log.warning("reload failed: resuming with the stores", slot=self.slot)
        await self.stores.resume()
        self.http.draining = self.services.ws.draining = False
        self.accept.resume()

    # ---- the end ------------------------------------------------------------------------------
    def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("draining", open=len(self.http.conns))
        self.accept.close()
        self.http.drain()
        self.services.ws.drain()  # each socket closes with 1001 once its replies are done
        asyncio.ensure_future(self._finish_drain())

    async def _finish_drain(self) -> None:
        ws = self.services.ws
        deadline = time.monotonic() + self.cfg["server"]["graceful_timeout"]
        # (and the owner calls it is answering for others: after a reload's release, calls other
        # workers sent here are forwarded to the next generation; leaving first lost their answers)
        while (self.http.conns or ws.sessions or self.mesh.pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.http.conns or ws.sessions:
            log.warning("graceful timeout: closing connections", open=len(self.http.conns), websockets=len(ws.sessions))
            ws.close_all()
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
        self.services.ws.close_all("worker stopping")
        await self.owners.close()  # a forwarding mesh left from a RELEASE
        if self.mesh:
            self.mesh.close()
        self.stores.close()
        await self.services.close()
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
