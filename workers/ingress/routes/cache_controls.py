"""What a request asks of the response caches, from its `cache` body object and its headers
(LiteLLM's `cache: {ttl, namespace, no-cache, no-store}`, Portkey's force-refresh and
namespaces, Helicone's `Cache-Control: max-age`):

    body   "cache": {"ttl": 60, "namespace": "eval-7", "no_cache": true, "no_store": false,
                     "mode": "exact" | "semantic" | "both"}
    headers Cache-Control: no-cache | no-store | max-age=60
            X-Tidegate-Cache-Namespace: eval-7       X-Tidegate-Cache-Mode: exact|semantic|both
            X-Tidegate-Cache-Refresh: true           (= no-cache: asked anew, the answer stored)

The body wins over a header. A namespace keeps a request's entries apart from every other
namespace's (within its tenant, as always); ttl shortens how long its answer is kept (never past
cache.exact_ttl or the tenant's semantic ttl); mode limits both the lookup and the store to one
cache. A field the caches cannot honour is refused with a 400 naming it (`cache.<field>`)."""
from __future__ import annotations

import re
from typing import NamedTuple

from tidegate.core.http.http11 import HttpError

MODES = ("both", "exact", "semantic")
FIELDS = {"ttl", "namespace", "no_cache", "no_store", "mode"}
NAMESPACE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_MAX_AGE = re.compile(rb"max-age\s*=\s*(\d+)")


class CachePlan(NamedTuple):
    lookup: bool = True          # look the answer up (no-cache / refresh: False)
    store: bool = True           # store the answer (no-store: False)
    mode: str = "both"           # which caches: both, exact, semantic
    ttl: float | None = None     # seconds the stored answer is kept (None: the configured ttl)
    namespace: str = ""          # salts its keys ("" = the tenant's default space)

    @property
    def exact(self) -> bool:
        return self.mode in ("both", "exact")

    @property
    def semantic(self) -> bool:
        return self.mode in ("both", "semantic")

    @property
    def refresh(self) -> bool:
        return not self.lookup

    def key_tenant(self, tenant: str) -> str:
        """What the cache keys are salted with: the tenant, and the namespace when there is one."""
        return f"{tenant}\x1f{self.namespace}" if self.namespace else tenant


def _bad(message: str, param: str) -> HttpError:
    return HttpError(400, message, "invalid_parameter", param=param)


def plan_of(body: dict, headers: dict | None) -> CachePlan:
    h = headers or {}
    control = h.get(b"cache-control", b"").lower()
    lookup, store = b"no-cache" not in control, b"no-store" not in control
    if h.get(b"x-tidegate-cache-refresh", b"").lower() in (b"1", b"true", b"yes"):
        lookup = False
    m = _MAX_AGE.search(control)
    ttl = float(m.group(1)) if m else None
    mode = h.get(b"x-tidegate-cache-mode", b"both").decode("latin-1").strip().lower()
    if mode not in MODES:
        raise _bad("X-Tidegate-Cache-Mode must be exact, semantic or both", "X-Tidegate-Cache-Mode")
    ns = h.get(b"x-tidegate-cache-namespace", b"").decode("latin-1").strip()
    if ns and not NAMESPACE.match(ns):
        raise _bad("X-Tidegate-Cache-Namespace must be 1 to 64 letters, digits and ._:-", "X-Tidegate-Cache-Namespace")
    c = body.get("cache")
    if c is not None:
        if not isinstance(c, dict):
            raise _bad("'cache' must be an object {ttl, namespace, no_cache, no_store, mode}", "cache")
        unknown = sorted(set(c) - FIELDS)
        if unknown:
            raise _bad(f"'cache.{unknown[0]}' is not a cache control tidegate honours (known: "
                       f"{', '.join(sorted(FIELDS))})", f"cache.{unknown[0]}")
        if "ttl" in c:
            if isinstance(c["ttl"], bool) or not isinstance(c["ttl"], (int, float)) or not 0 < c["ttl"] <= 10 ** 9:
                raise _bad("'cache.ttl' must be a number of seconds > 0", "cache.ttl")
            ttl = float(c["ttl"])
        if "namespace" in c:
            if not isinstance(c["namespace"], str) or not NAMESPACE.match(c["namespace"]):
                raise _bad("'cache.namespace' must be 1 to 64 letters, digits and ._:-", "cache.namespace")
            ns = c["namespace"]
        for k in ("no_cache", "no_store"):
            if k in c and not isinstance(c[k], bool):
                raise _bad(f"'cache.{k}' must be true or false", f"cache.{k}")
        lookup = not c["no_cache"] if "no_cache" in c else lookup
        store = not c["no_store"] if "no_store" in c else store
        if "mode" in c:
            if c["mode"] not in MODES:
                raise _bad("'cache.mode' must be exact, semantic or both", "cache.mode")
            mode = c["mode"]
    return CachePlan(lookup, store, mode, ttl, ns)
