"""The loop of the blocking worker processes (inference, embedder, view builder).

Their work is a blocking call (llama_decode, an embedding batch, an LMDB transaction), so they
run a plain loop instead of an event loop, in the shape of redis's ae.c:

    poll (no wait while busy) -> take every waiting message -> work (one unit)
    -> before_sleep: send what this turn queued, one frame per client -> timers (heartbeat first)

A subclass names its endpoint and fills in the hooks; the base owns the sockets, signals,
heartbeats, error answers and the exit codes (core/runtime/process.py). A message whose handler
raises is answered with an error event and never takes the process down.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import orjson
import zmq

from tidegate.core.base.filelock import StoreLocked
from tidegate.core.base.jsonlog import log
from tidegate.core.messaging import protocol
from tidegate.core.runtime.process import WORKER_BOOT_ERROR, start_worker


class RequestError(Exception):
    """(status, message, code, param): a request the worker refuses, answered as an ERR event."""


class WorkerSockets:
    """A ROUTER the worker's clients (the ingress workers) connect to, and a DEALER to the
    supervisor for READY, heartbeats and its commands."""

    def __init__(self, spec: dict, endpoint: str):
        self.spec = spec
        self.ctx = zmq.Context(1)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.max_frame = spec["config"]["server"]["max_frame_bytes"]
        self.router.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, 100000)
        self.router.bind(endpoint)
        self.link = self.ctx.socket(zmq.DEALER)
        self.link.setsockopt(zmq.IDENTITY, spec["id"].encode())
        self.link.setsockopt(zmq.LINGER, 0)
        self.link.connect(spec["internal"])
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.link, zmq.POLLIN)

    def take(self, limit: int = 10000) -> list:
        """Every (peer, [op, rid, body]) waiting now; a frame carries a list of messages."""
        out = []
        for _ in range(limit):
            try:
                peer, frame = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except ValueError:  # not [peer, frame]
                continue
            try:
                out += [(peer, m) for m in orjson.loads(frame) if isinstance(m, list) and len(m) == 3]
            except (orjson.JSONDecodeError, TypeError):
                continue
        return out

    def commands(self) -> list[dict]:
        """Unsolicited messages from the supervisor (protocol.PURGE…)."""
        out = []
        while True:
            try:
                out.append(protocol.decode(self.link.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return out
            except protocol.ProtocolError:
                continue

    def send(self, events: dict) -> None:
        """{peer: [event, ...]}: one frame per peer."""
        for peer, evs in events.items():
            frames, too_big = protocol.pack(evs, self.max_frame)
            if too_big:  # answered with an error instead: one frame too large would drop the link
                frames += protocol.pack([protocol.error_event(e[1], 413, "answer larger than server.max_frame_bytes; "
                                                              "ask for less", "response_too_large")
                                         for e in too_big], self.max_frame)[0]
            try:
                for frame in frames:
                    self.router.send_multipart([peer, frame], zmq.NOBLOCK)
            except zmq.ZMQError:
                log.warning("client not reading; events dropped", events=len(evs))

    def ready(self) -> None:
        self.report(protocol.READY)

    def report(self, op: str) -> None:
        self.link.send(protocol.encode({"op": op, "pid": os.getpid()}))

    def heartbeat(self, extra: dict) -> bool:
        """Send counters to the supervisor; False when the supervisor is gone (then exit)."""
        if os.getppid() != self.spec["supervisor_pid"]:
            log.error("supervisor is gone; exiting")
            return False
        try:
            self.link.send(protocol.encode({"op": protocol.HEARTBEAT, "snap": {"extra": extra}}), zmq.NOBLOCK)
        except zmq.Again:
            pass
        return True

    def close(self) -> None:
        self.router.close(0)
        self.link.close(0)
        self.ctx.destroy(0)  # and any socket a subclass added (a pressure PUB)


class BlockingWorker:
    """Base of a blocking worker process. Hooks, all optional but open():

    open() -> endpoint      load models; the ROUTER endpoint to bind
    open_stores()           take the durable stores (StoreLocked while another process holds them)
    close_stores()          flush and let go of them (reload hand-off; also at exit)
    handle(peer, op, rid, body)  one request (raise RequestError to refuse it)
    on_messages(msgs)       all of a turn's messages at once (default: handle() each)
    on_command(msg)         a supervisor command
    busy() -> bool          work waits: poll without sleeping
    work()                  one unit of work per turn
    before_sleep()          after this turn's events left (e.g. save what the step produced)
    counters() -> dict      heartbeat counters
    drained(now) -> bool    after SIGTERM: True once it may exit (default: at once)
    """
    idle_poll_ms = 50

    def __init__(self, spec: dict):
        self.spec, self.cfg = spec, spec["config"]
        self.running, self.draining = True, False
        self.out: dict[bytes, list] = {}  # peer -> events queued this turn
        self._timers: list[list] = []     # [due, interval, fn]
        self._heartbeat_timer = None

    # ---- hooks ----------------------------------------------------------------------------------
    def open(self) -> str:
        raise NotImplementedError

    def open_stores(self) -> None:
        pass

    def close_stores(self) -> None:
        pass

    def handle(self, peer: bytes, op: str, rid, body) -> None:
        raise RequestError(400, f"unknown op {op!r}", "bad_op", None)

    def on_messages(self, msgs: list) -> None:
        for peer, (op, rid, body) in msgs:
            try:
                self.handle(peer, op, rid, body)
            except RequestError as e:
                self.send(peer, protocol.error_event(rid, *e.args))
            except Exception as e:  # a bad request must not take the worker down
                log.error("request failed", op=op, error=repr(e))
                self.send(peer, protocol.error_event(rid, 500, "worker error", "internal"))

    def on_command(self, msg: dict) -> None:
        pass

    def busy(self) -> bool:
        return False

    def work(self) -> None:
        pass

    def before_sleep(self) -> None:
        pass

    def counters(self) -> dict:
        return {}

    def drained(self, now: float) -> bool:
        return True

    # ---- for subclasses -------------------------------------------------------------------------
    def send(self, peer: bytes, event: list) -> None:
        self.out.setdefault(peer, []).append(event)

    def every(self, seconds: float, fn) -> None:
        self._timers.append([time.monotonic() + seconds, seconds, fn])

    def beat_if_due(self) -> None:
        """Heartbeat from inside a long piece of work, so the supervisor does not take it for hung."""
        hb = self._heartbeat_timer
        now = time.monotonic()
        if hb is not None and now >= hb[0]:
            hb[0] = now + hb[1]
            self._heartbeat()

    # ---- the loop -------------------------------------------------------------------------------
    def boot(self) -> None:
        self.socks = WorkerSockets(self.spec, self.open())
        self.socks.report(protocol.STANDBY)  # on a reload the old generation now lets go of the stores
        self._take_stores(self.cfg["server"]["boot_timeout"])
        self.socks.ready()

    def _take_stores(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            try:
                return self.open_stores()
            except StoreLocked:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def _command(self, msg: dict) -> None:
        if msg["op"] == protocol.RELEASE:
            log.info("releasing stores to the next generation")
            self.close_stores()
            self.socks.report(protocol.RELEASED)
        elif msg["op"] == protocol.RESUME:
            log.warning("reload failed: resuming with the stores")
            self._take_stores(self.cfg["server"]["boot_timeout"])
        else:
            self.on_command(msg)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "draining", True))
        signal.signal(signal.SIGQUIT, lambda *_: setattr(self, "running", False))
        self._heartbeat_timer = [0.0, self.cfg["server"]["heartbeat_interval"], self._heartbeat]
        self._timers.insert(0, self._heartbeat_timer)
        socks = self.socks
        while self.running:
            if socks.poller.poll(0 if self.busy() else self.idle_poll_ms):
                for msg in socks.commands():
                    self._command(msg)
                msgs = socks.take()
                if msgs:
                    self.on_messages(msgs)
            self.work()
            self.flush()
            self.before_sleep()
            now = time.monotonic()
            for timer in self._timers:
                if now >= timer[0]:
                    timer[0] = now + timer[1]
                    timer[2]()
            if self.draining and self.drained(now):
                break
        self._heartbeat()
        self.close_stores()
        socks.close()

    def flush(self) -> None:
        """Send what this turn queued: one frame per client."""
        if self.out:
            self.socks.send(self.out)
            self.out = {}

    def _heartbeat(self) -> None:
        self.running = self.socks.heartbeat(self.counters()) and self.running


def run_blocking_worker(name_of, make) -> None:
    """main() of a blocking worker: make(spec) is a BlockingWorker; exit codes as named."""
    worker = make(start_worker(name_of))
    try:
        worker.boot()
    except Exception as e:
        log.error("worker failed to boot", error=repr(e))
        sys.exit(WORKER_BOOT_ERROR)
    try:
        worker.run()
    except Exception as e:
        log.error("worker crashed", error=repr(e))
        sys.exit(1)
