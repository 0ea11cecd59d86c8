"""Every ZeroMQ endpoint name, built in one place from the config's run_dir.

Blocking workers' endpoints carry the generation: after a reload the new ingress workers talk
to the new inference worker (or embedder) while the old pair finishes what it has.
"""
from __future__ import annotations

import os


def _run(cfg: dict) -> str:
    return os.path.abspath(cfg["server"]["run_dir"])


def internal(cfg: dict) -> str:
    """The supervisor's ROUTER for worker READY, heartbeats and requests."""
    return f"ipc://{_run(cfg)}/supervisor.sock"


def control(cfg: dict) -> str:
    """The admin control socket (configured, or ipc in run_dir)."""
    return cfg["control"]["endpoint"] or f"ipc://{_run(cfg)}/control.sock"


def peer(run_dir: str, slot: int, gen: int) -> str:
    """An ingress worker's mesh ROUTER; per generation, so each generation's mesh only ever
    reaches owners of its own generation (the old one hands its stores to the new one)."""
    return f"ipc://{os.path.abspath(run_dir)}/peer-{slot}.g{gen}.sock"


def _base(kind: str, name: str) -> str:
    return {"inference": f"infer-{name}", "embedder": "embedder", "views": "views", "models": "models"}[kind]


def worker(cfg: dict, kind: str, name: str, gen: int) -> str:
    """A blocking worker's ROUTER: kind "inference" (name = model), "embedder", "views" or "models"."""
    return f"ipc://{_run(cfg)}/{_base(kind, name)}.g{gen}.sock"


def pressure(cfg: dict, kind: str, name: str, gen: int) -> str:
    """A downstream's PUB socket for its per-class pressure (core/overload/pressure.py)."""
    return f"ipc://{_run(cfg)}/{_base(kind, name)}.g{gen}.pub"


def ipc_path(endpoint: str) -> str | None:
    """The file behind an ipc:// endpoint, else None."""
    return endpoint[6:] if endpoint.startswith("ipc://") else None
