"""The supervisor (`tidegate serve`): owns the listening sockets, spawns and watches workers.

Modelled on gunicorn's arbiter: signal handlers only enqueue the signal and wake the loop
through a self-pipe; one loop reacts to signals, worker messages (ready, heartbeat, requests),
admin commands and timers. Exit codes are a protocol:

  worker  0 clean exit      3 failed to boot   other: crashed (respawned with backoff)
  daemon  0 stopped/drained 1 bad config       3 a worker failed to boot   4 cannot bind

Listening sockets are made here, one SO_REUSEPORT socket per (address, worker slot), and kept
open for the daemon's life: a worker that replaces another in the same slot inherits the same
socket, so connections queued in its backlog during a respawn or reload are never refused.
"""
from __future__ import annotations

import collections
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import orjson
import psutil
import zmq
from setproctitle import setproctitle

from tidegate.core import __version__
from tidegate.core.base import config
from tidegate.core.base.jsonlog import log
from tidegate.core.base.metrics import Aggregator
from tidegate.core.base.sdnotify import Notifier
from tidegate.core.messaging import control, endpoints, protocol
from tidegate.core.overload.box import BoxWatch, measure
from tidegate.core.runtime.process import (EXIT_BIND, EXIT_BOOT, EXIT_CONFIG, EXIT_OK, SPEC_ENV,
                                           WORKER_BOOT_ERROR, spec_fd)
from tidegate.workers import EMBEDDER, INFERENCE, INGRESS, Slot, load_config, slots
SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)
EXPLAIN_TIMEOUT_MS = 2000  # admin cache explain: how long the supervisor waits for the embedder


class BindError(OSError):
    pass


@dataclass
class Worker:
    id: str
    slot: Slot
    gen: int
    proc: subprocess.Popen
    spawned: float
    state: str = "booting"          # booting -> ready -> retiring
    ready_at: float = 0.0
    last_hb: float = 0.0
    snap: dict = field(default_factory=dict)


class Listeners:
    """SO_REUSEPORT listening sockets keyed by (address, slot); owned by the supervisor."""

    def __init__(self, backlog: int):
        self.backlog = backlog
        self.socks: dict[tuple[str, int], socket.socket] = {}
        self.ports: dict[str, int] = {}   # address as configured -> actual port (for :0)

    def ensure(self, addresses: list[str], slots: int) -> None:
        """Open whatever (address, slot) sockets are missing; BindError names the address."""
        for addr in addresses:
            host, port = config.parse_bind(addr)
            port = self.ports.get(addr, port)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            if port and not any(a == addr for a, _ in self.socks):
                self._probe(addr, family, host, port)
            for slot in range(slots):
                if (addr, slot) in self.socks:
                    continue
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                try:
                    s.bind((host, port))
                except OSError as e:
                    s.close()
                    raise BindError(e.errno, f"cannot bind {addr}: {e.strerror}") from None
                s.listen(self.backlog)
                s.set_inheritable(True)
                port = self.ports[addr] = s.getsockname()[1]
                self.socks[(addr, slot)] = s

    @staticmethod
    def _probe(addr, family, host, port) -> None:
        # SO_REUSEPORT would happily share a port with another tidegate: a plain bind tells us
        # whether anyone at all listens there.
        p = socket.socket(family, socket.SOCK_STREAM)
        try:
            p.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            p.bind((host, port))
        except OSError as e:
            raise BindError(e.errno, f"cannot bind {addr}: {e.strerror}") from None
        finally:
            p.close()

    def fds(self, addresses: list[str], slot: int) -> list[int]:
        return [self.socks[(a, slot)].fileno() for a in addresses]

    def keep_only(self, addresses: list[str], slots: int) -> None:
        for key in [k for k in self.socks if k[0] not in addresses or k[1] >= slots]:
            self.socks.pop(key).close()
        self.ports = {a: p for a, p in self.ports.items() if a in addresses}

    def close_all(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks.clear()

    def bound(self) -> list[str]:
        return [f"{config.parse_bind(a)[0]}:{p}" for a, p in self.ports.items()]


class Supervisor:
    def __init__(self, cfg: dict, cfg_path: str | None, overrides: dict):
        self.cfg, self.cfg_path, self.overrides = cfg, cfg_path, overrides
        self.started = time.monotonic()
        self.state = "starting"      # starting -> running <-> reloading -> draining | stopping
        self.exit_code: int | None = None
        self.gen = 1
        self.pending: dict | None = None   # reload in progress: {"gen", "cfg", "waiters"}
        self.workers: dict[str, Worker] = {}
        self.respawn_at: dict[int, float] = {}
        self.crashes: collections.Counter = collections.Counter()  # slot -> quick crashes in a row
        self.respawns = 0
        self.metrics_renders = 0
        self._metrics: tuple[float, bytes] | None = None  # (when, the rendered text): render_metrics
        self.degraded: dict[str, str] = {}  # slot -> why it is not serving now (cleared at its READY)
        self.forced_shed: set[str] = set()  # classes an operator sheds now (admin shed on|off)
        self.box = BoxWatch(cfg["overload"])  # box-level overload: memory and fds -> graded actions
        self.box_due = 0.0
        self.sigqueue: collections.deque = collections.deque()
        self.deadline = 0.0
        self._ids = 0
        self.aggregator = Aggregator()
        self.notifier = Notifier()
        self.listeners = Listeners(cfg["server"]["backlog"])

    # ---- set-up -------------------------------------------------------------------------------
    def _setup(self) -> None:
        srv = self.cfg["server"]
        control.ensure_run_dir(srv["run_dir"])
        os.makedirs(srv["data_dir"], mode=0o700, exist_ok=True)
        self.pidfile = os.path.join(srv["run_dir"], "supervisor.pid")
        other = _running_pid(self.pidfile)
        if other:
            raise BindError(errno.EADDRINUSE, f"another tidegate (pid {other}) uses run_dir {srv['run_dir']}")
        self.listeners.ensure(config.binds(self.cfg), config.resolve_workers(self.cfg))
        with open(self.pidfile, "w") as f:
            f.write(str(os.getpid()))
        self.ctx = zmq.Context()
        self.internal = self.ctx.socket(zmq.ROUTER)
        self.internal.setsockopt(zmq.MAXMSGSIZE, self.cfg["server"]["max_frame_bytes"])
        self.internal.setsockopt(zmq.LINGER, 0)
        ipath = endpoints.ipc_path(endpoints.internal(self.cfg))
        if os.path.exists(ipath):
            os.unlink(ipath)
        self.internal.bind(endpoints.internal(self.cfg))
        os.chmod(ipath, 0o600)
        self.control, self.auth = control.bind_server(self.ctx, self.cfg)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        self.poller = zmq.Poller()
        self.poller.register(self.internal, zmq.POLLIN)
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.wake_r, zmq.POLLIN)

    def _on_signal(self, signum, frame) -> None:
        self.sigqueue.append(signum)   # act in the loop, never in the handler

    # ---- main loop ----------------------------------------------------------------------------
    def run(self) -> int:
        setproctitle("tidegate: supervisor")
        log.configure(process="supervisor", level=self.cfg["log"]["level"])
        try:
            self._setup()
        except BindError as e:
            log.error("cannot start", error=e.strerror)
            return EXIT_BIND
        log.info("starting", version=__version__, bind=self.listeners.bound(),
                 workers=config.resolve_workers(self.cfg), config=self.cfg_path or "(built-in defaults)",
                 control=endpoints.control(self.cfg), open_files=raise_nofile())
        self.notifier.status("starting workers")
        for slot in slots(self.cfg):
            self._spawn(slot, self.gen, self.cfg)
        try:
            while self.exit_code is None:
                self._tick()
        finally:
            self._cleanup()
        log.info("stopped", exit_code=self.exit_code)
        return self.exit_code

    def _tick(self) -> None:
        events = dict(self.poller.poll(self._poll_timeout_ms()))
        if self.wake_r in events:
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        while self.sigqueue:
            self._handle_signal(self.sigqueue.popleft())
        if self.internal in events:
            self._drain_socket(self.internal, self._on_worker_message)
        if self.control in events:
            self._drain_socket(self.control, self._on_control)
        self._reap()
        self._check_timers()
        self.notifier.watchdog_due(time.monotonic())

    def _poll_timeout_ms(self) -> int:
        timeout = 0.25  # coarse enough to be idle, fine enough for heartbeat and respawn timers
        wd = self.notifier.watchdog_due(time.monotonic())
        if wd is not None:
            timeout = min(timeout, max(wd, 0.0))
        return int(timeout * 1000)

    @staticmethod
    def _drain_socket(sock, handler) -> None:
        for _ in range(1000):  # bounded so a chatty peer cannot starve signals and timers
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    # ---- signals ------------------------------------------------------------------------------
    def _handle_signal(self, sig: int) -> None:
        if sig == signal.SIGCHLD:
            return  # _reap runs every tick
        log.info("signal", signal=signal.Signals(sig).name)
        if sig == signal.SIGHUP:
            self.reload()
        elif sig == signal.SIGTERM:
            self.drain()
        elif sig in (signal.SIGINT, signal.SIGQUIT):
            self.stop(EXIT_OK)

    def reload(self, waiter: bytes | None = None) -> None:
        if self.state != "running":
            self._answer_reload([waiter], ok=False, message=f"cannot reload while {self.state}")
            return
        try:
            new = load_config(self.cfg_path, self.overrides)
            self.listeners.ensure(config.binds(new), config.resolve_workers(new))
        except (config.ConfigError, BindError) as e:
            msg = str(e) if isinstance(e, config.ConfigError) else e.strerror
            log.error("reload rejected; still serving with the previous config", error=msg)
            self._answer_reload([waiter], ok=False, message=f"reload rejected: {msg}")
            return
        self.state = "reloading"
        self.notifier.reloading()
        log.configure(level=new["log"]["level"])
        gen = self.gen + 1
        self.pending = {"gen": gen, "cfg": new, "waiters": [waiter]}
        for slot in slots(new):
            self._spawn(slot, gen, new)
        log.info("reloading", gen=gen, workers=config.resolve_workers(new))

    def _maybe_release(self) -> None:
        """Reload hand-off: once every process of the new generation is up to its stores
        (standby) or ready, the old generation lets go of them (RELEASE: flush, fsync, close,
        unlock) and the new one opens them: never two writers of one store."""
        p = self.pending
        if p is None or p.get("released"):
            return
        new = [w for w in self.workers.values() if w.gen == p["gen"]]
        if len(new) < len(slots(p["cfg"])) or any(w.state not in ("standby", "ready") for w in new):
            return
        p["released"] = True
        for w in self.workers.values():
            if w.gen != p["gen"] and w.state == "ready":
                self._send(w, {"op": protocol.RELEASE, "gen": p["gen"]})
        log.info("old generation releasing its stores", gen=p["gen"] - 1)

    def _send(self, w: "Worker", msg: dict) -> None:
        self.internal.send_multipart([w.id.encode(), protocol.encode(msg)])

    def _finish_reload(self, ok: bool, why: str = "") -> None:
        p, self.pending = self.pending, None
        if ok:
            for w in self.workers.values():
                if w.gen != p["gen"]:
                    self._retire(w)
            self.cfg, self.gen = p["cfg"], p["gen"]
            self.box.configure(self.cfg["overload"])
            self.respawn_at.clear()
            self.degraded.clear()  # every process of the new generation is READY
            log.info("reloaded", gen=self.gen)
        else:
            for w in self.workers.values():
                if w.gen == p["gen"]:
                    self._kill(w, signal.SIGKILL)
                    w.state = "retiring"
                elif p.get("released") and w.state == "ready":
                    self._send(w, {"op": protocol.RESUME})  # take the stores back once the new ones are gone
            log.configure(level=self.cfg["log"]["level"])
            log.error("reload failed; still serving with the previous config", error=why)
        self._trim_listeners()
        self.state = "running"
        self.notifier.ready("serving")
        self._answer_reload(p["waiters"], ok, "reloaded" if ok else f"reload failed: {why}")

    def _answer_reload(self, waiters, ok: bool, message: str) -> None:
        for w in waiters:
            if w is not None:
                self._reply(w, {"op": protocol.REPLY, "ok": ok, "message": message, "gen": self.gen})

    def drain(self) -> None:
        if self.state in ("draining", "stopping"):
            return
        log.info("draining", graceful_timeout=self.cfg["server"]["graceful_timeout"])
        self.notifier.stopping()
        self.state = "draining"
        self.listeners.close_all()  # workers hold their own copies until they stop accepting
        self.deadline = time.monotonic() + self.cfg["server"]["graceful_timeout"] + 2.0
        for w in self.workers.values():
            self._kill(w, signal.SIGTERM)

    def stop(self, code: int) -> None:
        if self.state == "stopping":
            return
        self.notifier.stopping()
        self.state = "stopping"
        self.stop_code = code
        self.deadline = time.monotonic() + 2.0
        for w in self.workers.values():
            self._kill(w, signal.SIGQUIT)

    # ---- workers ------------------------------------------------------------------------------
    def _spawn(self, slot: Slot, gen: int, cfg: dict) -> None:
        """Start the process for slot: its kind's module (workers/__init__.py), its spec in a memfd."""
        self._ids += 1
        spec = {"kind": slot.kind, "slot": slot.index, "gen": gen, "config": config.for_worker(cfg, slot.kind),
                "internal": endpoints.internal(cfg), "supervisor_pid": os.getpid()}
        fds: list[int] = []
        if slot.kind == INGRESS:
            fds = self.listeners.fds(config.binds(cfg), slot.index)
            spec.update(fds=fds, n_slots=config.resolve_workers(cfg))
        elif slot.kind == INFERENCE:
            spec["model"] = next(m for m in config.models(cfg) if m["name"] == slot.name)
        spec["id"] = f"{slot.label}.g{gen}.{self._ids}"
        sfd = spec_fd(spec)
        try:
            proc = subprocess.Popen([sys.executable, "-m", slot.module], pass_fds=[*fds, sfd],
                                    env=dict(os.environ, **{SPEC_ENV: str(sfd)}), stdin=subprocess.DEVNULL)
        finally:
            os.close(sfd)
        self.workers[spec["id"]] = Worker(spec["id"], slot, gen, proc, time.monotonic())
        log.info("spawned worker", worker=spec["id"], worker_pid=proc.pid)

    def _kill(self, w: Worker, sig: int) -> None:
        try:
            w.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def _retire(self, w: Worker) -> None:
        w.state = "retiring"
        self._kill(w, signal.SIGTERM)

    def _reap(self) -> None:
        for w in list(self.workers.values()):
            code = w.proc.poll()
            if code is not None:
                del self.workers[w.id]
                self.aggregator.retire(w.id)
                self._on_exit(w, code)
        if self.state in ("draining", "stopping") and not self.workers:
            self.exit_code = getattr(self, "stop_code", EXIT_OK) if self.state == "stopping" else EXIT_OK

    def _on_exit(self, w: Worker, code: int) -> None:
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
        if self.state in ("draining", "stopping") or w.state == "retiring":
            log.info("worker exited", worker=w.id, worker_pid=w.proc.pid, how=how)
            self._trim_listeners()
            return
        if w.state in ("booting", "standby"):
            why = f"worker {w.id} exited with {how} before it was ready" + (
                " (boot error: see its log line above)" if code == WORKER_BOOT_ERROR else "")
            if self.pending and w.gen == self.pending["gen"]:
                self._finish_reload(False, why)
                return
            if self.state == "starting":  # only a boot failure at start halts the daemon
                log.error("worker failed to boot; stopping the daemon", worker=w.id, how=how)
                self.stop(EXIT_BOOT)
                return
            # after start a process that cannot boot is retried with backoff; the rest serves
            self.degraded[str(w.slot)] = why
            lived = 0.0
        else:
            lived = time.monotonic() - w.ready_at
        self.crashes[w.slot] = self.crashes[w.slot] + 1 if lived < 10.0 else 0
        delay = 0.0 if self.crashes[w.slot] <= 1 else min(
            0.1 * 2 ** (self.crashes[w.slot] - 1), self.cfg["server"]["respawn_backoff_max"])
        log.warning("worker died; respawning", worker=w.id, worker_pid=w.proc.pid, how=how, delay_s=delay)
        self.respawn_at[w.slot] = time.monotonic() + delay
        self.degraded.setdefault(str(w.slot), f"worker {w.id} exited with {how}; respawning")

    def _check_timers(self) -> None:
        now = time.monotonic()
        srv = self.cfg["server"]
        for w in self.workers.values():
            if w.state in ("booting", "standby") and now - w.spawned > srv["boot_timeout"]:
                log.error("worker not ready within boot_timeout; killing it", worker=w.id)
                self._kill(w, signal.SIGKILL)
            elif w.state == "ready" and now - w.last_hb > srv["worker_timeout"]:
                log.error("worker missed heartbeats; killing it", worker=w.id, silent_s=round(now - w.last_hb, 1))
                self._kill(w, signal.SIGKILL)
                w.state = "hung"
        if self.state in ("running", "reloading"):
            for slot, due in list(self.respawn_at.items()):
                if due <= now:
                    del self.respawn_at[slot]
                    self.respawns += 1
                    self._spawn(slot, self.gen, self.cfg)
        if now >= self.box_due:
            self.box_due = now + self.cfg["overload"]["box_interval"]
            self._watch_box()
        if self.state in ("draining", "stopping") and now > self.deadline:
            for w in self.workers.values():
                log.warning("worker did not stop in time; killing it", worker=w.id)
                self._kill(w, signal.SIGKILL)
            self.deadline = now + 5.0

    def _watch_box(self) -> None:
        """Measure memory and fds; tell every ready ingress worker when the box-level actions change."""
        live = list(self.workers.values())  # one already gone measures as nothing
        rss, fd = measure([w.proc.pid for w in live], [w.proc.pid for w in live if w.slot.kind == INGRESS])
        if self.box.update(rss, fd):
            log.warning("box-level overload actions changed", **self.box.describe())
            for w in live:  # (inference workers act on trim: their prefix RAM tier)
                if w.state == "ready" and w.slot.kind in (INGRESS, INFERENCE):
                    self._send(w, {"op": protocol.BOX, "actions": sorted(self.box.active)})

    def _expected(self) -> int:
        return len(slots(self.cfg))

    def _ready_count(self, gen: int) -> int:
        return sum(1 for w in self.workers.values() if w.gen == gen and w.state == "ready")

    def _trim_listeners(self) -> None:
        """Close sockets no configuration in use needs any more (after old workers are gone)."""
        if self.pending or any(w.state == "retiring" for w in self.workers.values()):
            return
        self.listeners.keep_only(config.binds(self.cfg), config.resolve_workers(self.cfg))

    # ---- messages from workers ----------------------------------------------------------------
    def _on_worker_message(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        ident, frame = frames
        try:
            msg = protocol.decode(frame)
        except protocol.ProtocolError:
            return
        w = self.workers.get(ident.decode())
        if w is None:
            return
        op, now = msg["op"], time.monotonic()
        w.last_hb = now
        if "snap" in msg:
            w.snap = msg["snap"]
            self.aggregator.update(w.id, w.snap)
        if op == protocol.STANDBY:
            if w.state == "booting":
                w.state = "standby"
                self._maybe_release()
        elif op == protocol.RELEASED:
            log.info("worker released its stores", worker=w.id)
        elif op == protocol.READY:
            if w.state in ("booting", "standby"):
                w.state, w.ready_at = "ready", now
                if w.gen == self.gen:
                    self.degraded.pop(str(w.slot), None)
                log.info("worker ready", worker=w.id, worker_pid=w.proc.pid)
                self._on_ready(w)
        elif op == protocol.METRICS:
            self._reply_worker(ident, msg, self.render_metrics().decode())
        elif op == protocol.READINESS:
            ready, expected = self._ready_count(self.gen), self._expected()
            ok = self.state == "running" and ready >= expected or self.state == "reloading"
            lag = self.aggregator.totals()["extra"].get("view_lag_seconds", 0.0)
            lagging = lag > self.cfg["events"]["view_lag_max"]
            self._reply_worker(ident, msg, {"ready": ok and not lagging, "state": self.state, "workers_ready": ready,
                                            "workers_expected": expected, "view_lag_seconds": lag,
                                            "degraded": self.degraded})

    def _on_ready(self, w: Worker) -> None:
        if w.slot.kind == INGRESS and self.forced_shed:
            self._send(w, {"op": protocol.SHED, "classes": sorted(self.forced_shed)})
        if w.slot.kind in (INGRESS, INFERENCE) and self.box.active:
            self._send(w, {"op": protocol.BOX, "actions": sorted(self.box.active)})
        if self.pending and w.gen == self.pending["gen"]:
            self._maybe_release()
            if self._ready_count(w.gen) >= len(slots(self.pending["cfg"])):
                self._finish_reload(True)
        elif self.state == "starting" and self._ready_count(self.gen) >= self._expected():
            self.state = "running"
            self.notifier.ready(f"serving on {', '.join(self.listeners.bound())}")
            log.info("ready", bind=self.listeners.bound(), workers=self._expected())

    def _reply_worker(self, ident: bytes, msg: dict, body) -> None:
        self.internal.send_multipart([ident, protocol.encode({"op": protocol.REPLY, "id": msg.get("id"),
                                                              "body": body})])

    def render_metrics(self) -> bytes:
        """The Prometheus text, rendered at most once per server.metrics_interval: a flood of
        /metrics (each worker coalesces its own) must not keep the supervisor from readiness."""
        now = time.monotonic()
        if self._metrics is not None and now - self._metrics[0] < self.cfg["server"]["metrics_interval"]:
            return self._metrics[1]
        self.metrics_renders += 1
        text = self._render_metrics()
        self._metrics = (now, text)
        return text

    def _render_metrics(self) -> bytes:
        return self.aggregator.render([
            ("gauge", "tidegate_workers_ready", "Ingress workers ready", self._ready_count(self.gen)),
            ("gauge", "tidegate_workers_expected", "Ingress workers configured", self._expected()),
            ("counter", "tidegate_worker_respawns", "Workers respawned after dying or hanging", self.respawns),
            ("gauge", "tidegate_workers_degraded", "Processes configured but not serving now (see /readyz)",
             len(self.degraded)),
            ("counter", "tidegate_metrics_renders", "Times /metrics was rendered (at most once per "
             "server.metrics_interval)", self.metrics_renders),
        ])

    # ---- admin control socket -----------------------------------------------------------------
    def _on_control(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            return
        ident = frames[0]
        try:
            msg = protocol.decode(frames[2])
        except protocol.ProtocolError as e:
            return self._reply(ident, {"op": protocol.REPLY, "ok": False, "message": str(e)})
        op = msg["op"]
        if op == "reload":
            if self.pending:
                self.pending["waiters"].append(ident)
            else:
                self.reload(waiter=ident)
            return
        if op == "status":
            body = self.status()
        elif op == "workers":
            body = self.worker_table()
        elif op == "config":
            body = {"path": self.cfg_path, "config": config.redacted(self.cfg)}
        elif op == "metrics":
            body = self.render_metrics().decode()
        elif op == "cache":
            body = self._cache(msg)
            if body is None:
                return self._reply(ident, {"op": protocol.REPLY, "ok": False,
                                           "message": "cache: action must be stats or purge"})
        elif op == "breakers":
            body = {w.id: w.snap.get("breakers") for w in self.workers.values()
                    if w.state == "ready" and getattr(w, "snap", None) and w.snap.get("breakers")}
        elif op == "backends":
            body = {w.id: w.snap.get("backends") for w in self.workers.values()
                    if w.state == "ready" and getattr(w, "snap", None) and w.snap.get("backends")}
        elif op == "shed":
            body = self._shed(msg)
            if body is None:
                return self._reply(ident, {"op": protocol.REPLY, "ok": False,
                                           "message": "shed: action must be on, off or status, with a class "
                                                      "(critical, standard, background) for on and off"})
        elif op == "drain":
            body = {"message": "draining"}
            self.drain()
        elif op == "stop":
            body = {"message": "stopping"}
            self.stop(EXIT_OK)
        else:
            return self._reply(ident, {"op": protocol.REPLY, "ok": False,
                                       "message": f"unknown command {op!r}; known: {', '.join(protocol.CONTROL_OPS)}"})
        self._reply(ident, {"op": protocol.REPLY, "ok": True, "body": body})

    def _reply(self, ident: bytes, msg: dict) -> None:
        self.control.send_multipart([ident, b"", protocol.encode(msg)])

    def _cache(self, msg: dict) -> dict | None:
        """admin cache stats: counters from the workers' latest snapshots; purge: tell every
        worker that holds cache state (ingress: exact entries it owns; the embedder)."""
        if msg.get("action") == "stats":
            extra = self.aggregator.totals()["extra"]
            return {k: extra.get(k, 0) for k in (
                "exact_hits", "exact_misses", "exact_inserts", "exact_evictions", "exact_bytes", "semantic_lookups",
                "semantic_hits", "semantic_verifier_rejections", "semantic_timeouts", "semantic_inserts",
                "semantic_evictions", "semantic_expired", "semantic_entries", "embed_batches", "embed_texts")}
        if msg.get("action") == "explain":
            return self._explain(msg)
        if msg.get("action") == "purge":
            tenant = msg.get("tenant")
            told = 0
            for w in self.workers.values():
                if w.state == "ready" and w.slot.kind in (INGRESS, EMBEDDER):
                    self._send(w, {"op": protocol.PURGE, "tenant": tenant})
                    told += 1
            log.info("cache purge", tenant=tenant or "(all)", workers=told)
            return {"message": f"purge of {tenant or 'all tenants'} sent to {told} workers"}
        return None

    def _explain(self, msg: dict) -> dict:
        """admin cache explain TEXT [--tenant T]: ask the embedder for the nearest cached texts and
        the verdict a lookup would reach on each (at the tenant's threshold)."""
        text, tenant = msg.get("text"), msg.get("tenant")
        if not isinstance(text, str) or not text.strip():
            return {"message": "cache explain needs a text", "nearest": []}
        emb = next((w for w in self.workers.values() if w.state == "ready" and w.slot.kind == EMBEDDER), None)
        if emb is None:
            return {"message": "the semantic cache is off or its embedder is not running", "nearest": []}
        c = self.cfg["cache"]
        threshold = next((o.get("threshold", c["semantic_threshold"]) for o in c["semantic_tenants"]
                          if o["tenant"] == tenant), c["semantic_threshold"])
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoints.worker(self.cfg, "embedder", "", emb.gen))
            sock.send(orjson.dumps([[protocol.EXPLAIN, 1, {"tenant": tenant, "text": text, "threshold": threshold,
                                                           "min_overlap": c["semantic_min_overlap"], "k": 5}]]))
            if not sock.poll(EXPLAIN_TIMEOUT_MS):  # (an admin call: the supervisor waits at most this long)
                return {"message": "the embedder did not answer in time", "nearest": []}
            event = orjson.loads(sock.recv())[0]
        finally:
            sock.close()
        if event[0] != protocol.EXPLAIN:
            return {"message": f"the embedder refused: {event[2]}", "nearest": []}
        return {"threshold": threshold, "tenant": tenant, **event[2]}  # (the embedder's: 0 resolved)

    def _shed(self, msg: dict) -> dict | None:
        """admin shed on|off CLASS: force shedding of a class for a drill (classes whose policy is
        never are still served); status: what is forced now. New ingress workers are told at READY."""
        action, cls = msg.get("action"), msg.get("cls")
        if action in ("on", "off"):
            if cls not in config.CLASSES:
                return None
            (self.forced_shed.add if action == "on" else self.forced_shed.discard)(cls)
            for w in self.workers.values():
                if w.state == "ready" and w.slot.kind == INGRESS:
                    self._send(w, {"op": protocol.SHED, "classes": sorted(self.forced_shed)})
            log.info("forced shedding", classes=", ".join(sorted(self.forced_shed)) or "none")
        elif action != "status":
            return None
        return {"forced": sorted(self.forced_shed), "policy": self.cfg["overload"]["shed"]}

    def status(self) -> dict:
        return {"pid": os.getpid(), "version": __version__, "state": self.state,
                "uptime_s": round(time.monotonic() - self.started, 1), "generation": self.gen,
                "workers_ready": self._ready_count(self.gen), "workers_expected": self._expected(),
                "bind": self.listeners.bound(), "config": self.cfg_path or "(built-in defaults)",
                "control": endpoints.control(self.cfg), "respawns": self.respawns, "degraded": self.degraded,
                "metrics_renders": self.metrics_renders, "limits": self.aggregator.limits(),
                "box": self.box.describe()}

    def worker_table(self) -> list[dict]:
        now, rows = time.monotonic(), []
        for w in sorted(self.workers.values(), key=lambda w: (w.slot.kind != INGRESS, str(w.slot), w.gen)):
            try:
                rss = psutil.Process(w.proc.pid).memory_info().rss
            except psutil.Error:
                rss = 0
            reqs = sum(n for _, _, n in w.snap.get("requests", ()))
            rows.append({"id": w.id, "slot": w.slot.index if w.slot.kind == INGRESS else str(w.slot), "gen": w.gen, "pid": w.proc.pid, "state": w.state,
                         "uptime_s": round(now - w.spawned, 1),
                         "heartbeat_age_s": round(now - w.last_hb, 1) if w.last_hb else None,
                         "rss_bytes": rss, "requests": reqs,
                         "open_connections": w.snap.get("open_connections", 0)})
        return rows

    # ---- tear-down ----------------------------------------------------------------------------
    def _cleanup(self) -> None:
        for w in self.workers.values():
            self._kill(w, signal.SIGKILL)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        self.listeners.close_all()
        self.internal.close(0)
        self.control.close(0)
        if self.auth:
            self.auth.stop()
        self.ctx.term()
        for path in (self.pidfile, endpoints.ipc_path(endpoints.internal(self.cfg)),
                     endpoints.ipc_path(endpoints.control(self.cfg))):
            if path is None:
                continue
            try:
                os.unlink(path)
            except OSError:
                pass


def _running_pid(pidfile: str) -> int | None:
    try:
        pid = int(open(pidfile).read().strip())
    except (OSError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        if pid != os.getpid() and "tidegate" in " ".join(proc.cmdline() + [proc.name()]):
            return pid
    except psutil.Error:
        pass
    return None


def raise_nofile() -> int:
    """Raise this process's soft open-files limit to the hard one (workers inherit it): every
    connection is a descriptor. Returns what it got (the unit sets LimitNOFILE)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return int(soft)


def serve(cfg_path: str | None, overrides: dict) -> int:
    try:
        cfg = load_config(cfg_path, overrides)
    except config.ConfigError as e:
        log.error("invalid config", error=str(e))
        print(f"tidegate: invalid config: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return Supervisor(cfg, cfg_path, overrides).run()
