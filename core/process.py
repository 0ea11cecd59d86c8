"""What every worker process does first: read its spec, name itself, set up logging.

The supervisor starts workers with fork+exec and hands each its spec (slot, generation, config,
inherited fds…) as JSON in $TIDEGATE_WORKER_SPEC. Exit codes are a protocol with the supervisor:
0 clean, EXIT_BOOT_ERROR (3) failed before READY (the supervisor then halts), others crashed.
"""
from __future__ import annotations

import os
import signal

import orjson
from setproctitle import setproctitle

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
