"""Which traffic class a request belongs to, decided once at the door and carried to every downstream.

The most specific declaration wins: the downstream's own class (a model declared `class =
"critical"`: every request to it is critical), else the longest matching route prefix in
`classes.routes`, else the caller's class: its API key's `class`, else `classes.tenants[tenant]`
(both resolved when the keys are loaded, so sessions opened by the key carry it too), else
`classes.default`.
"""
from __future__ import annotations


class Classes:
    def __init__(self, cfg: dict):
        c = cfg["classes"]
        self.routes = sorted(c["routes"].items(), key=lambda kv: -len(kv[0]))
        self.default = c["default"]

    def of(self, path: str, caller_class: str, declared: str | None = None) -> str:
        """declared: the downstream's class (None or "": none); caller_class: the identity's ("" for
        an open gateway's anonymous caller)."""
        if declared:
            return declared
        for prefix, cls in self.routes:
            if path.startswith(prefix):
                return cls
        return caller_class or self.default
