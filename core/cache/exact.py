"""The exact response cache: identical reproducible requests are answered without the model.

Key: SHA-256 over the tenant, the model, the route and the canonical JSON of everything that
changes the output (messages or prompt, tools, response format, every sampling parameter). Only
reproducible requests are cached (temperature 0, or a fixed seed) unless `cache.exact_any`
says otherwise. An entry lives at the ring owner of its key, like every other piece of state:
a lookup is a direct call there or one mesh hop, and never a message to the inference worker.
Each owner keeps its entries in an LRU bounded by bytes, with a TTL; an expired entry stays for
`cache.exact_stale_ttl` more, served only to a request being shed (marked stale).
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict

import orjson

from tidegate.core.messaging.protocol import XC_GET, XC_PUT, XC_STALE
# request fields that change what the model answers; everything else (stream, user...) does not
OUTPUT_FIELDS = ("messages", "prompt", "tools", "tool_choice", "response_format", "max_tokens",
                 "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "logit_bias",
                 "presence_penalty", "frequency_penalty", "repeat_penalty", "n", "logprobs", "top_logprobs",
                 "parallel_tool_calls")


def cache_key(tenant: str, model: str, route: str, body: dict) -> str:
    material = [tenant, model, route, {k: body[k] for k in OUTPUT_FIELDS if k in body}]
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def reproducible(params: dict) -> bool:
    return params.get("temperature") == 0.0 or params.get("seed") is not None


class ExactStore:
    """Owner side: entries this worker owns. {key: (expires, tenant, entry, size)}."""

    def __init__(self, max_bytes: int, ttl: float, stale_ttl: float = 0.0):
        self.max_bytes, self.ttl, self.stale_ttl = max_bytes, ttl, stale_ttl
        self.entries: OrderedDict[str, tuple] = OrderedDict()
        self.bytes = 0
        self.stats = {"hits": 0, "misses": 0, "inserts": 0, "evictions": 0, "expired": 0}

    def get(self, key: str):
        item = self.entries.get(key)
        if item is None:
            self.stats["misses"] += 1
            return None
        if item[0] < time.time():
            if item[0] + self.stale_ttl < time.time():
                self._drop(key)  # past the stale window too: gone
            self.stats["expired"] += 1
            self.stats["misses"] += 1
            return None
        self.entries.move_to_end(key)
        self.stats["hits"] += 1
        return item[2]

    def get_stale(self, key: str):
        """The entry even past its ttl, within exact_stale_ttl: for a request being shed."""
        item = self.entries.get(key)
        if item is None or item[0] + self.stale_ttl < time.time():
            return None
        return item[2]

    def put(self, msg: list) -> bool:
        key, tenant, entry = msg[:3]
        ttl = min(self.ttl, float(msg[3])) if len(msg) > 3 and msg[3] else self.ttl  # (a request's cache.ttl)
        size = len(key) + len(orjson.dumps(entry))
        if size > self.max_bytes:
            return False
        if key in self.entries:
            self._drop(key)
        self.entries[key] = (time.time() + ttl, tenant, entry, size)
        self.bytes += size
        self.stats["inserts"] += 1
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))
            self.stats["evictions"] += 1
        return True

    def purge(self, tenant: str | None) -> int:
        keys = [k for k, item in self.entries.items() if tenant is None or item[1] == tenant]
        for k in keys:
            self._drop(k)
        return len(keys)

    def _drop(self, key: str) -> None:
        item = self.entries.pop(key)
        self.bytes -= item[3]


class ExactCache:
    """Asker side: each key's entry lives at its ring owner (core/state/owners.py)."""

    def __init__(self, cfg: dict, owners):
        c = cfg["cache"]
        self.enabled, self.any = c["exact_enabled"], c["exact_any"]
        self.timeout = c["owner_timeout"]
        self.owners = owners
        self.store = ExactStore(c["exact_max_bytes"], c["exact_ttl"], c["exact_stale_ttl"])
        owners.register({XC_GET: self.store.get, XC_PUT: self.store.put, XC_STALE: self.store.get_stale})

    def counters(self) -> dict:
        """The entries this worker owns (the cluster's are counted there)."""
        st = self.store.stats
        return {"exact_hits": st["hits"], "exact_misses": st["misses"], "exact_inserts": st["inserts"],
                "exact_evictions": st["evictions"], "exact_bytes": self.store.bytes}

    async def get(self, key: str, stale: bool = False):
        """The entry, or None: a miss also when the owner does not answer in time. stale: also an
        entry past its ttl (within exact_stale_ttl), for a request being shed."""
        found = self.owners.call(self.owners.owner_of(key.encode()), XC_STALE if stale else XC_GET, key, self.timeout)
        if not asyncio.isfuture(found):
            return found
        try:
            return await found
        except Exception:
            return None

    def put(self, key: str, tenant: str, entry: dict, ttl: float | None = None) -> None:
        """A lost insert only costs a later miss. ttl: shorter than exact_ttl, for this entry."""
        msg = [key, tenant, entry] + ([ttl] if ttl else [])
        self.owners.send(self.owners.owner_of(key.encode()), XC_PUT, msg, self.timeout)
