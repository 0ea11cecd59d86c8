"""The OpenAI-compatible routes of an ingress worker.

    GET  /v1/models             GET  /v1/models/{id}         POST /v1/chat/completions
    POST /v1/completions        POST /v1/embeddings

A generation reads top to bottom, each step in one place:

    parse (routes/request.py: a frozen GenRequest, every bad parameter a 400 naming it)
      -> guard (workers/ingress/guard.py: who, and the request rate; before the handler runs)
      -> class (set on the GenRequest from the route, the caller and the model)
      -> caches (`_cached`: exact, then semantic)
      -> admission (`_admit`: shedding, the in-flight cap, tokens/minute, the breaker)
      -> submit (the model's WorkerClient, or RemoteModel for remote backends)
      -> reply (routes/replies.py: Generation turns events into the answer; its on_done settles)

The inference worker renders the chat template, tokenizes, checks the context length and
generates. Non-streamed answers are one JSON body; streamed ones are SSE `data:` chunks in
OpenAI's shapes ending with `data: [DONE]`. A streamed request waits for its first event before
answering, so errors found by the inference worker (context overflow, full queue) still get their
own status code. A client that disconnects cancels its sequence.
"""
from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import replace

import numpy as np

from tidegate.core.base.breaker import CLOSED, Breaker, TenantBreakers
from tidegate.core.http.http11 import HttpError, json_response, service_unavailable
from tidegate.core.llm.failover import falls_back
from tidegate.core.llm.structured import Bounds
from tidegate.core.messaging import protocol
from tidegate.core.messaging.protocol import Failure
from tidegate.core.messaging.worker_client import WorkerUnavailable
from tidegate.core.state.ratelimit import Refusal
from tidegate.workers.ingress.guard import caller, refusal_error
from tidegate.workers.ingress.routes.replies import Generation
from tidegate.workers.ingress.routes.request import (GenRequest, Spec, parse_body, parse_chat, parse_completion,
                                                      parse_embeddings, unknown_model)

DEMO_NOTE = "demo model: tiny, random weights, real Llama-2 tokenizer; its text is gibberish"


class OpenAIRoutes:
    def __init__(self, cfg: dict, models: list[dict], clients: dict, limiter, classes, exact=None, semantic=None,
                 shedder=None, breakers=None):
        self.cfg, self.limits, self.inf = cfg, cfg["limits"], cfg["inference"]
        self.models = {m["name"]: m for m in models}
        self.clients, self.limiter, self.exact, self.semantic = clients, limiter, exact, semantic
        self.shedder = shedder
        self.breakers = breakers or {}  # "inference:MODEL" -> Breaker: a failing model answers at once
        # and one per tenant of each: failures only a tenant's own requests meet refuse that tenant alone
        self.tenant_breakers = {name: TenantBreakers(lambda: Breaker.from_config(cfg["breakers"], slow_call=1e9))
                                for name in self.breakers}
        self.spec = Spec(self.models, self.inf, classes, exact is not None and exact.enabled,
                         cfg["cache"]["exact_any"], semantic is not None, Bounds.of(self.inf))
        self.created = int(time.time())
        self.inflight = 0  # generations submitted and not yet over: counted here, released by on_done
        self.fallbacks = 0  # requests a model's fallback (inference.models[].fallbacks) took

    def add_to(self, router, guard) -> None:
        router.add("GET", "/v1/models", guard(self.list_models))
        router.add("GET", "/v1/models/{model}", guard(self.get_model))
        router.add("POST", "/v1/chat/completions", guard(self.chat))
        router.add("POST", "/v1/completions", guard(self.completions))
        router.add("POST", "/v1/embeddings", guard(self.embeddings))

    def counters(self) -> dict:
        return {"llm_inflight": self.inflight, "model_fallbacks": self.fallbacks,
                "tenant_breakers_open": sum(t.open_now() for t in self.tenant_breakers.values())}

    # ---- /v1/models ---------------------------------------------------------------------------
    def _model_object(self, name: str) -> dict:
        m = self.models[name]
        item = {"id": name, "object": "model", "created": self.created,
                "owned_by": "tidegate" if m["path"] else "tidegate-demo"}
        if not m["path"]:
            item["description"] = DEMO_NOTE
        return item

    def list_models(self, req):
        return json_response({"object": "list", "data": [self._model_object(name) for name in self.models]})

    def get_model(self, req):
        name = req.params["model"]
        if name not in self.models:
            raise unknown_model(name, self.spec)
        return json_response(self._model_object(name))

    # ---- the routes ---------------------------------------------------------------------------
    async def chat(self, req):
        return await self.generate(req, parse_chat(parse_body(req, self.limits), caller(req), req.path, self.spec,
                                                   headers=req.headers))

    async def completions(self, req):
        return await self.generate(req, parse_completion(parse_body(req, self.limits), caller(req), req.path,
                                                         self.spec, headers=req.headers))

    async def generate(self, req, g: GenRequest, reply=Generation):
        """One generation: caches, admission, submit, reply. `reply` shapes the answer
        (Generation, or a factory of another shape: /v1/responses)."""
        hit = await self._cached(req, g, reply)
        if hit is not None:
            return hit
        refused = self._shed(g)
        if refused is not None and not self.models[g.model].get("fallbacks"):
            return await self._fallback(req, g, reply, refused)  # (with fallbacks, the chain asks them)
        reservation = await self._admit(req, g)
        call = reply(g, self.inf["stream_window"], self._on_done(g, reservation), keep_text=_storable(req, g))
        if g.cache.refresh:  # the client asked it anew (no-cache, refresh): said so, and stored again
            call.cache_header = [(b"x-tidegate-cache", b"refresh")]
        body = g.body(self.inf["request_timeout"], call.window)
        if b"idempotency-key" in req.headers:  # the client allows a lost attempt to be repeated
            body["idempotent"] = True
        chain = Chain(self, g, call, body)
        refusal = chain.start()
        if refusal is not None:  # every model of the chain refused it (breaker open, worker gone)
            self._settle(reservation, 0)
            return await self._fallback(req, g, reply, refusal)
        self.inflight += 1
        req.on_close = call.client_left
        call.watch(self.inf["idle_timeout"], self.inf["request_timeout"] + self.inf["idle_timeout"])
        try:
            return await call.first
        except HttpError as e:  # refused for load before any byte went out: a cached class's fallback
            if e.code not in protocol.LOAD_NOT_FAILURE:
                raise
            load = e
        return await self._fallback(req, g, reply, lambda: load)

    def _on_done(self, g: GenRequest, reservation):
        """The generation's bookkeeping, run once when it is over (replies.Generation calls it):
        the in-flight count, the tokens/minute reservation, and the caches."""
        def done(entry, used):
            self.inflight -= 1
            if used is not None:
                self._settle(reservation, used)
            if entry is not None:
                if g.exact_key is not None:
                    self.exact.put(g.exact_key, g.tenant, entry, g.cache.ttl)
                if g.semantic_key is not None and self.semantic.policy(g.tenant)["enabled"]:
                    self.semantic.insert(g.semantic_key[0], g.tenant, g.semantic_key[1], entry, g.cache.ttl,
                                         g.model)
        return done

    # ---- caches -------------------------------------------------------------------------------
    async def _cached(self, req, g: GenRequest, reply):
        """Answer from the exact, then the semantic cache (when the request may be cached and
        Cache-Control allows a lookup), else None."""
        if not g.reusable or g.params.get("logprobs") is not None or not g.cache.lookup:
            return None  # (a cached answer has no log-probabilities to give; no-cache: asked anew)
        if g.exact_key is not None:
            entry = await self.exact.get(g.exact_key)
            if entry is not None:
                return await reply(g).replay(entry, b"exact")
        if g.semantic_key is not None and self.semantic.policy(g.tenant)["enabled"]:
            ns, text = g.semantic_key
            hit = await self.semantic.lookup(ns, text, self.semantic.policy(g.tenant)["threshold"])
            if hit is not None:
                if self.semantic.should_audit(g.model, hit.get("how") == "promoted"):
                    self._audit(g, hit)
                return await reply(g).replay(hit["entry"], b"semantic")
        return None

    def _audit(self, g: GenRequest, hit: dict) -> None:
        """Ask the model the query a semantic hit answered, in the background class, off the
        request path (the client has its answer already): the embedder compares the two answers
        and the namespace's error budget reads the outcome. Skipped when the background class is
        shed or the model's breaker is not closed (an audit never takes a half-open breaker's
        trial); a failure is no outcome. The gateway's own work: not charged to the tenant's
        limits."""
        bg = replace(g, cls="background", stream=False)
        breaker = self.breakers.get(g.downstream)
        if self._shed(bg) is not None or (breaker is not None and breaker.state != CLOSED):
            self.semantic.stats["semantic_audits_skipped"] += 1
            return
        sc, ns = self.semantic, g.semantic_key[0]

        def on_event(kind, payload):
            if kind in (protocol.END, protocol.ERR):
                sc.auditing -= 1
                if kind == protocol.END and payload.get("finish_reason") in ("stop", "length"):
                    sc.audited(ns, hit, payload.get("text") or "")
        try:
            self.clients[g.model].submit(protocol.GENERATE, bg.body(self.inf["request_timeout"], 0), on_event)
        except WorkerUnavailable:
            self.semantic.stats["semantic_audits_skipped"] += 1
            return
        sc.auditing += 1
        sc.stats["semantic_audits_started"] += 1

    async def _fallback(self, req, g: GenRequest, reply, refusal):
        """The model may not be asked (its class is shed, its breaker is open, or the request
        waited past its class's queueing deadline). A cached class gets, in order: a stale
        exact-cache answer (RFC 5861 stale-if-error), the nearest semantic-cache entry when the
        route allows approximations (overload.approximate), the model's fallback_text; anything
        else the HttpError refusal() makes. Never the model."""
        sh = self.shedder
        if sh is None or not sh.cached(g.cls) or g.n > 1 or g.tools is not None:
            raise refusal()  # a cached entry is one plain answer: not n choices, not tool calls
        if g.exact_key is not None:
            entry = await self.exact.get(g.exact_key, stale=True)
            if entry is not None:
                return await reply(g).replay(entry, b"stale", sh.served(g.cls, "stale"))
        ov = self.cfg["overload"]
        if ov["approximate"] and g.semantic_key is not None and g.path in ov["approximate_routes"] \
                and self.semantic.policy(g.tenant)["enabled"]:
            hit = await self.semantic.lookup(g.semantic_key[0], g.semantic_key[1], ov["approximate"],
                                             approximate=True)
            if hit is not None:
                return await reply(g).replay(hit["entry"], b"approximate", sh.served(g.cls, "approximate"))
        text = self.models[g.model].get("fallback_text")
        if text:
            entry = {"text": text, "finish_reason": "stop",
                     "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
            return await reply(g).replay(entry, b"fallback", sh.served(g.cls, "fallback"))
        raise refusal()

    # ---- admission ----------------------------------------------------------------------------
    def _shed(self, g):
        """None when g's downstream takes its class now, else what makes the refusal."""
        retry = self.shedder.check(g.cls, g.downstream) if self.shedder is not None else None
        if retry is None:
            return None
        return lambda: self.shedder.reject(g.cls, retry, f"model {g.model!r}")

    async def _admit(self, req, g: GenRequest):
        """The in-flight cap, n choices as n requests, then tokens/minute: the reservation to
        settle (or None)."""
        if self.inflight >= self.inf["max_inflight"]:
            raise service_unavailable(f"this worker has {self.inflight} generations in flight "
                                      f"(inference.max_inflight); retry shortly", "too_many_inflight")
        if g.n > 1 and self.limiter.enabled:  # (the guard took one request's worth)
            refusal = self.limiter.admit_more(caller(req), g.n - 1)
            if asyncio.isfuture(refusal):
                refusal = await refusal
            if refusal is not None:
                raise refusal_error(refusal)
        return await self._reserve(caller(req), g.reserve_tokens(self.inf["default_max_tokens"]))

    async def _reserve(self, ident, tokens: int):
        """Tokens/minute: reserve up front (429 when the buckets cannot cover it), settled on the
        real usage; None when no tokens/minute limit applies."""
        if not self.limiter.token_limits:
            return None
        reservation = self.limiter.reserve(ident, tokens)
        if asyncio.isfuture(reservation):
            reservation = await reservation
        if reservation.__class__ is Refusal:
            raise refusal_error(reservation)
        return reservation

    def _settle(self, reservation, used: int) -> None:
        if reservation is not None:
            self.limiter.settle(reservation, used)

    # ---- /v1/embeddings -----------------------------------------------------------------------
    async def embeddings(self, req):
        e = parse_embeddings(parse_body(req, self.limits), caller(req), req.path, self.spec)
        refused = self._shed(e)
        if refused is not None:  # no cached embeddings: a shed request of any policy gets the 503
            raise refused()
        reservation = await self._reserve(caller(req), e.prompt_estimate)
        fut = asyncio.get_running_loop().create_future()

        def on_event(kind, payload):
            if fut.done():
                return
            if kind == protocol.ERR:
                fut.set_exception(protocol.http_error(payload))
            else:
                fut.set_result(payload)
        try:
            self.clients[e.model].submit(protocol.EMBED, {"input": e.input, "cls": e.cls,
                                                          "timeout": self.inf["request_timeout"]}, on_event)
            res = await fut
        except WorkerUnavailable as err:
            self._settle(reservation, 0)
            raise service_unavailable(str(err), "worker_unavailable") from None
        except HttpError:
            self._settle(reservation, 0)
            raise
        self._settle(reservation, res["tokens"])  # embedding tokens count against tokens/minute too
        data = []
        for i, v in enumerate(res["data"]):
            emb = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if e.base64 else v
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = res["tokens"]
        return json_response({"object": "list", "data": data, "model": e.model,
                              "usage": {"prompt_tokens": n, "total_tokens": n}})


def _storable(req, g: GenRequest) -> bool:
    """Whether the answer goes into the caches: one reusable plain answer without logprobs (a
    cached answer has none to give), unless Cache-Control says no-store."""
    return bool(g.reusable and g.params.get("logprobs") is None and (g.exact_key or g.semantic_key)
                and g.cache.store)


class Chain:
    """The model asked for, then its `fallbacks` in order: the next one takes the request when
    one refuses it (shed, breaker open, worker gone) or fails before any of its answer reached
    the client (failover.falls_back: down, failing, rate-limited, its window too small). Each
    model's breakers count its own outcome; the answer names the model that gave it."""

    def __init__(self, routes: "OpenAIRoutes", g: GenRequest, call, body: dict):
        self.routes, self.g, self.call, self.body = routes, g, call, body
        self.names = [g.model, *routes.models[g.model].get("fallbacks", ())]
        self.i, self.current, self.delivered = 0, -1, False

    def start(self):
        """Submit to the next model that takes it: None, else the first refusal's maker."""
        routes, first = self.routes, None
        while self.i < len(self.names):
            name = self.names[self.i]
            self.i += 1
            g = self.g if name == self.g.model else replace(self.g, model=name, downstream=f"inference:{name}")
            refusal = routes._shed(g)
            breaker = routes.breakers.get(g.downstream)
            mine = routes.tenant_breakers[g.downstream].of(g.tenant) if breaker is not None else None
            # the tenant's first: a trial it takes and loses costs it alone; an allowed call is submitted
            for b, whose in ((mine, "this tenant's requests"), (breaker, "its requests")):
                if refusal is None and b is not None and not b.allow():
                    retry_s = max(1, int(b.open_for + 0.999))
                    refusal = _open_refusal(name, whose, retry_s)
            if refusal is None:
                index = self.current = self.i - 1
                handler = (lambda kind, payload, index=index: self.on_event(index, kind, payload))
                if breaker is not None:
                    handler = _counted(handler, breaker, mine)
                link = routes.clients[name]
                try:
                    rid = link.submit(protocol.GENERATE, self.body, handler)
                except WorkerUnavailable as e:
                    if breaker is not None:
                        breaker.record(False)
                        mine.record(False)
                    refusal = _unavailable(str(e))
                else:
                    self.call.attach(link, rid)
                    if name != self.g.model:
                        routes.fallbacks += 1
                        self.call.served_by(name, fallback=True)
                    return None
            first = first or refusal
        return first

    def on_event(self, index: int, kind: str, payload) -> None:
        if index != self.current:
            return  # (a model the request already left)
        if kind == protocol.ERR and not self.delivered and self.i < len(self.names) and falls_back(payload):
            if self.start() is None:
                return  # the next model took it: this failure never reaches the client
        if kind in (protocol.DELTA, protocol.END):
            self.delivered = True
        self.call.on_event(kind, payload)


def _open_refusal(model: str, whose: str, retry_s: int):
    return lambda: service_unavailable(f"model {model!r} is failing {whose}; its circuit breaker is open "
                                       f"(retry after {retry_s}s)", "circuit_open", retry_after=retry_s)


def _unavailable(message: str):
    return lambda: service_unavailable(message, "worker_unavailable")


def _counted(handler, shared, mine):
    """handler, telling the breakers how the generation ended. Not failures: a full queue or a
    deadline passed in it (a flood of background work must not open the breaker on critical
    requests), a client error, a reader that stalled. The downstream's shared breaker counts what
    fails for everyone (Failure.is_downstream_fault); the tenant's own also its requests' own
    failures inside the worker."""
    t0 = time.monotonic()

    def on_event(kind, payload):
        if kind == protocol.END:
            took = time.monotonic() - t0
            shared.record(True, took)
            mine.record(True, took)
        elif kind == protocol.ERR:
            f = Failure.of(payload)
            shared.record(not f.is_downstream_fault)
            mine.record(not f.is_failure)
        handler(kind, payload)
    return on_event
