"""What every worker process does first (read its spec, name itself, set up logging), and the
exit codes every process speaks, named once.

The supervisor starts workers with fork+exec and hands each its spec (slot, generation, config,
inherited fds…) as JSON in an anonymous memory file (memfd) whose descriptor number is in
$TIDEGATE_WORKER_SPEC_FD: unlike the environment, which /proc/PID/environ keeps for the process's
life, it is read once and closed. The config in it has every secret masked but those the worker's kind uses (config.WORKER_SECRETS:
an ingress worker authenticates to the state cluster, Redis and remote backends). A worker's exit
code tells the supervisor what happened; the daemon's tells systemd (and the operator) why it stopped.
"""
from __future__ import annotations

import os
import signal

import orjson
from setproctitle import setproctitle

from tidegate.core.base.jsonlog import log

SPEC_ENV = "TIDEGATE_WORKER_SPEC_FD"

# worker exit codes (any other: crashed, respawned with backoff)
WORKER_OK = 0         # clean exit
WORKER_BOOT_ERROR = 3  # failed before READY: at start the supervisor halts the daemon

# daemon (`tidegate serve`) exit codes
EXIT_OK = 0           # stopped or drained
EXIT_CONFIG = 1       # invalid config (the message names the key)
EXIT_BOOT = 3         # a worker failed to boot at start
EXIT_BIND = 4         # a listen address (or the run dir) could not be taken


def spec_fd(spec: dict) -> int:
    """A memfd holding spec, positioned at its start, for the child to inherit (pass_fds)."""
    fd = os.memfd_create("tidegate-spec", 0)  # not inheritable until passed explicitly
    os.write(fd, orjson.dumps(spec))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def start_worker(name_of) -> dict:
    """The spec of this worker process; name_of(spec) gives its name ("ingress 0")."""
    fd = int(os.environ.pop(SPEC_ENV))
    with os.fdopen(fd, "rb") as f:
        spec = orjson.loads(f.read())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when workers stop
    nice = spec["config"]["server"].get("nice", {}).get(spec["kind"], 0)
    if nice:
        os.nice(nice)  # before any thread starts: llama.cpp's threads inherit it
    name = name_of(spec)
    setproctitle(f"tidegate: {name}")
    log.configure(process=name.replace(" ", "-"), level=spec["config"]["log"]["level"])
    return spec


def open_fds() -> int | None:
    """Descriptors this process holds now (Linux /proc; None elsewhere)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # (less the one listdir itself opened)
    except OSError:
        return None


def connection_cap(max_connections: int, held_for_self: int | None, reserve: int) -> int:
    """How many connections a worker may hold: max_connections, or fewer where the open-files
    limit less what the worker holds for itself (sockets, stores, pipes) and a reserve is lower.
    Past it accept() would fail with EMFILE, and libuv then accepts and closes the connections
    waiting in the backlog to drain it: stopping at the cap leaves them queued instead."""
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or held_for_self is None:
        return max_connections
    return max(1, min(max_connections, soft - held_for_self - reserve))
