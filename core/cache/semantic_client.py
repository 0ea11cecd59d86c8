"""The ingress side of the semantic cache: which namespace and text a request maps to, the
per-tenant policy, and lookups and inserts sent to the embedder process.

Namespace = tenant × model × route × system prompt × conversation so far (every message but the
last user message) × the parameters that shape the answer (max_tokens, stop, sampling), hashed: a hit never crosses tenants, and a multi-turn answer is only reused
in the same conversation context. The text embedded is the last user message (the prompt, for
/v1/completions). A lookup that takes longer than `semantic_timeout` counts as a miss: the cache
must never be slower than it is worth. A circuit breaker (`[breakers]`) keeps the count: once
lookups keep timing out or failing, they are skipped (a miss at once, counted in
`semantic_skipped`) until trial lookups come back in time.
"""
from __future__ import annotations

import asyncio
import hashlib

import orjson

from tidegate.core.base.breaker import CLOSED, Breaker
from tidegate.core.base.config import models
from tidegate.core.cache.exact import OUTPUT_FIELDS
from tidegate.core.llm.demo_model import is_demo
from tidegate.core.messaging.protocol import AUDIT, HIT, INSERT, LOOKUP, MISS


class SemanticClient:
    def __init__(self, cfg: dict, client):
        c = cfg["cache"]
        self.client = client
        self.default = {"enabled": True, "threshold": c["semantic_threshold"], "ttl": c["semantic_ttl"],
                        "max_entries": c["semantic_max_entries"]}
        self.tenants = {o["tenant"]: {**self.default, **o} for o in c["semantic_tenants"]}
        self.min_overlap, self.timeout = c["semantic_min_overlap"], c["semantic_timeout"]
        self.breaker = Breaker.from_config(cfg["breakers"], slow_call=self.timeout)
        self.stats = {"semantic_timeouts": 0, "semantic_skipped": 0, "semantic_inserts_skipped": 0,
                      "semantic_audits_started": 0, "semantic_audits_skipped": 0}
        self.audit_rate, self.audit_max = c["semantic_audit_rate"], c["semantic_audit_max_inflight"]
        self.audit_promoted_rate = c["semantic_audit_promoted_rate"]
        self.auditing, self.hits = 0, [0, 0]  # audits in flight from this worker; hits counted (plain, promoted)
        self.verified = {m["name"]: verifies(c["semantic_verify"], m) for m in models(cfg)}

    def counters(self) -> dict:
        return dict(self.stats)

    def policy(self, tenant: str) -> dict:
        return self.tenants.get(tenant, self.default)

    async def lookup(self, ns: str, text: str, threshold: float, approximate: bool = False):
        """The hit ({entry, score, id}), or None (a miss, an unavailable embedder or a slow one).
        approximate: the nearest entry at threshold or more, unverified (a shed request's
        approximation)."""
        if not self.breaker.allow():
            self.stats["semantic_skipped"] += 1
            return None
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        t0 = loop.time()

        def on_event(kind, payload):
            if not fut.done():
                self.breaker.record(kind in (HIT, MISS), loop.time() - t0)
                fut.set_result(payload if kind == HIT else None)
        try:
            rid = self.client.submit(LOOKUP, {"ns": ns, "text": text, "threshold": threshold,
                                                "min_overlap": self.min_overlap, "approximate": approximate},
                                     on_event)
        except Exception:
            self.breaker.record(False)
            return None

        def late():
            if not fut.done():
                self.breaker.record(False)
                fut.set_result(None)
        timer = loop.call_later(self.timeout, late)
        entry = await fut
        timer.cancel()
        if entry is None and rid in self.client.handlers:
            self.client.handlers.pop(rid, None)
            self.stats["semantic_timeouts"] += 1
        return entry

    def insert(self, ns: str, tenant: str, text: str, entry: dict, ttl: float | None = None,
               model: str = "") -> None:
        """Store an answer the model gave after a miss; where the model's answers mean something
        (`semantic_verify`), the embedder also verifies it against the nearest entry."""
        if self.breaker.state != CLOSED:  # the embedder is behind: more work would only deepen it
            self.stats["semantic_inserts_skipped"] += 1
            return
        p = self.policy(tenant)
        ttl = min(p["ttl"], ttl) if ttl else p["ttl"]  # (a request's cache.ttl only shortens it)
        self.client.send(INSERT, {"ns": ns, "tenant": tenant, "text": text, "entry": entry, "ttl": ttl,
                                  "max_entries": p["max_entries"], "verify": self.verified.get(model, False),
                                  "threshold": p["threshold"]})

    def should_audit(self, model: str, promoted: bool = False) -> bool:
        """Whether to audit this hit: every 1/rate-th (counted, not drawn: the share is exact and
        a test's run repeats; promoted hits at their own, higher rate), where the model's answers
        mean something, within the in-flight cap."""
        rate = self.audit_promoted_rate if promoted else self.audit_rate
        if not self.verified.get(model) or not rate:
            return False
        n = self.hits[promoted] = self.hits[promoted] + 1
        if int(n * rate) == int((n - 1) * rate):
            return False
        if self.auditing >= self.audit_max:
            self.stats["semantic_audits_skipped"] += 1
            return False
        return True

    def audited(self, ns: str, hit: dict, answer: str) -> None:
        """The model's answer now to a query a hit was served for: the embedder compares them."""
        self.client.send(AUDIT, {"ns": ns, "id": hit["id"], "score": hit["score"], "answer": answer})


def verifies(mode: str, model: dict) -> bool:
    """semantic_verify for one model: auto = on, except for a random-weight demo model (the
    built-in one, no path; or one `tidegate model make-demo` wrote), whose answers to two
    rephrasings differ by construction."""
    if mode != "auto":
        return mode == "on"
    if model.get("backends"):
        return True
    return bool(model.get("path")) and not is_demo(model["path"])


def semantic_key(tenant: str, model: str, what: dict, body: dict) -> tuple[str, str] | None:
    """(namespace, text to embed), or None when the request has no last user message."""
    if "prompt" in what:
        context, text = [], what["prompt"]
    else:
        msgs = what["messages"]
        if msgs[-1]["role"] != "user":
            return None
        context, text = msgs[:-1], msgs[-1]["content"]
    system = [m["content"] for m in context if m["role"] in ("system", "developer")]
    turns = [[m["role"], m["content"]] for m in context if m["role"] not in ("system", "developer")]
    shape = {k: body[k] for k in OUTPUT_FIELDS if k in body and k not in ("messages", "prompt")}
    h = hashlib.sha256(orjson.dumps([tenant, model, "prompt" in what, system, turns, shape],
                                    option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
    return h, text
