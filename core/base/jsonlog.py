"""Structured logs: one JSON object per line on stderr, secrets masked before they are written.

Fields whose name looks like a credential are replaced, and so are values that look like bearer
tokens or API keys wherever they appear, so a careless `log.info(..., headers=...)` still leaks
nothing.
"""
from __future__ import annotations

import os
import re
import sys
import time

import orjson

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_SECRET_NAME = re.compile(r"(authorization|api[_-]?key|token|secret|password|passwd|cookie|credential)", re.I)
_SECRET_VALUE = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+|\b(sk|tg|tgk|tgs)-[A-Za-z0-9_\-]{8,}")
MASK = "[redacted]"


def _mask_str(s: str) -> str:
    return _SECRET_VALUE.sub(lambda m: (m.group(1) or "") + MASK, s)


def scrub(value, name: str = ""):
    """Return value with secrets masked (recursing into dicts, lists and tuples)."""
    if name and _SECRET_NAME.search(name):
        return MASK
    if isinstance(value, str):
        return _mask_str(value)
    if isinstance(value, bytes):
        return _mask_str(value.decode("latin-1"))
    if isinstance(value, dict):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and isinstance(value[0], (str, bytes)):  # a (name, value) header pair
            n = value[0].decode("latin-1") if isinstance(value[0], bytes) else value[0]
            return [n, scrub(value[1], n)]
        return [scrub(v) for v in value]
    return value


class Logger:
    def __init__(self, process: str = "tidegate", level: str = "info", stream=None):
        self.process = process
        self.threshold = LEVELS[level]
        self.stream = stream or sys.stderr

    def configure(self, process: str | None = None, level: str | None = None) -> None:
        if process:
            self.process = process
        if level:
            self.threshold = LEVELS[level]

    def log(self, level: str, event: str, **fields) -> None:
        if LEVELS[level] < self.threshold:
            return
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
               "level": level, "process": self.process, "pid": os.getpid(), "event": _mask_str(event)}
        rec.update(scrub(fields))
        try:
            self.stream.write(orjson.dumps(rec, default=str).decode() + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take the process down

    def debug(self, event, **f): self.log("debug", event, **f)
    def info(self, event, **f): self.log("info", event, **f)
    def warning(self, event, **f): self.log("warning", event, **f)
    def error(self, event, **f): self.log("error", event, **f)


log = Logger()
