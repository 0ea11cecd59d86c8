"""What every worker process does first: read its spec, name itself, set up logging.

The supervisor starts workers with fork+exec and hands each its spec (slot, generation, config,
inherited fds…) as JSON in $TIDEGATE_WORKER_SPEC. Exit codes are a protocol with the supervisor:
0 clean, EXIT_BOOT_ERROR (3) failed before READY (the supervisor then halts), others crashed.
"""
from __future__ import annotations

import os
import signal
import sys

import orjson
import zmq
from setproctitle import setproctitle

from tidegate.core import protocol
from tidegate.core.jsonlog import log

SPEC_ENV = "TIDEGATE_WORKER_SPEC"
EXIT_BOOT_ERROR = 3


def start_worker(name_of) -> dict:
    """The spec of this worker process; name_of(spec) gives its name ("ingress 0")."""
    spec = orjson.loads(os.environ.pop(SPEC_ENV))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when workers stop
    name = name_of(spec)
    setproctitle(f"tidegate: {name}")
    log.configure(process=name.replace(" ", "-"), level=spec["config"]["log"]["level"])
    return spec


class WorkerSockets:
    """The sockets of a blocking (non-asyncio) worker — inference, embedder: a ROUTER its
    clients (the ingress workers) connect to, and a DEALER to the supervisor for READY and
    heartbeats."""

    def __init__(self, spec: dict, endpoint: str):
        self.spec = spec
        self.ctx = zmq.Context(1)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, spec["config"]["control"]["max_message_bytes"])
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, 100000)
        self.router.bind(endpoint)
        self.link = self.ctx.socket(zmq.DEALER)
        self.link.setsockopt(zmq.IDENTITY, spec["id"].encode())
        self.link.setsockopt(zmq.LINGER, 0)
        self.link.connect(spec["internal"])
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)

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

    def send(self, events: dict) -> None:
        """{peer: [event, ...]}: one frame per peer."""
        for peer, evs in events.items():
            try:
                self.router.send_multipart([peer, orjson.dumps(evs)], zmq.NOBLOCK)
            except zmq.ZMQError:
                log.warning("client not reading; events dropped", events=len(evs))

    def ready(self) -> None:
        self.link.send(protocol.encode({"op": protocol.READY, "pid": os.getpid()}))

    def heartbeat(self, extra: dict) -> bool:
        """Send counters to the supervisor; False when the supervisor is gone (then exit)."""
        if os.getppid() != self.spec["supervisor_pid"]:
            log.error("supervisor is gone; exiting")
            return False
        try:
            self.link.send(protocol.encode({"op": protocol.HEARTBEAT, "snap": {"extra": extra}}),
                           zmq.NOBLOCK)
        except zmq.Again:
            pass
        return True

    def close(self) -> None:
        self.router.close(0)
        self.link.close(0)
        self.ctx.term()


def run_blocking_worker(name_of, make) -> None:
    """main() of a blocking worker: make(spec) must have boot() and run(); exit codes as above."""
    worker = make(start_worker(name_of))
    try:
        worker.boot()
    except Exception as e:
        log.error("worker failed to boot", error=repr(e))
        sys.exit(EXIT_BOOT_ERROR)
    try:
        worker.run()
    except Exception as e:
        log.error("worker crashed", error=repr(e))
        sys.exit(1)
