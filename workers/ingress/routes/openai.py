"""The OpenAI-compatible routes of an ingress worker.

    GET  /v1/models             GET  /v1/models/{id}         POST /v1/chat/completions
    POST /v1/completions        POST /v1/embeddings

The ingress worker validates the request (every bad parameter is a 400 naming it), then hands
it to the inference worker of the model over its WorkerClient; the inference worker renders the
chat template, tokenizes, checks the context length and generates. Non-streamed answers are one
JSON body; streamed ones are SSE `data:` chunks in OpenAI's shapes ending with `data: [DONE]`.
A streamed request waits for its first event before answering, so errors found by the
inference worker (context overflow, full queue) still get their own status code. A client that
disconnects cancels its sequence.
"""
from __future__ import annotations

import asyncio
import base64
import math
import time
from collections import namedtuple

import numpy as np

from tidegate.core.cache.exact import cache_key, reproducible
from tidegate.core.http.http11 import HttpError, json_response, service_unavailable
from tidegate.core.http.jsonbody import parse_json
from tidegate.core.http.router import path_params
from tidegate.core.llm.structured import SchemaError, grammar_for
from tidegate.core.llm.tools import check_choice, check_tools, grammar_for_calls
from tidegate.core.messaging import protocol
from tidegate.core.messaging.worker_client import Unavailable
from tidegate.core.overload.classes import Classes
from tidegate.core.state.ratelimit import Refusal
from tidegate.workers.ingress.guard import caller, refusal_error
from tidegate.workers.ingress.routes.replies import Generation

ROLES = ("system", "developer", "user", "assistant", "tool")
ToolPlan = namedtuple("ToolPlan", "tools choice grammar")  # grammar: set when a call is forced
# what each route honours; anything else is a 400 naming it (never silently dropped)
SAMPLING = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "logit_bias", "stream",
            "stream_options", "n", "presence_penalty", "frequency_penalty", "repeat_penalty", "user"}
CHAT_FIELDS = SAMPLING | {"messages", "max_completion_tokens", "response_format", "logprobs", "top_logprobs",
                          "tools", "tool_choice", "parallel_tool_calls"}
COMPLETION_FIELDS = SAMPLING | {"prompt", "echo", "best_of", "suffix", "logprobs"}
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "user"}
# OpenAI parameters this server knows and does not implement (yet): refused as unsupported
UNSUPPORTED = {"functions", "function_call", "audio", "modalities", "prediction", "web_search_options",
               "reasoning_effort", "store", "metadata", "service_tier", "dimensions"}
DEMO_NOTE = "demo model: tiny, random weights, real Llama-2 tokenizer; its text is gibberish"


def _bad(message: str, param: str | None, code: str = "invalid_parameter") -> HttpError:
    return HttpError(400, message, code, param=param)


def _number(body: dict, name: str, lo: float, hi: float, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise _bad(f"'{name}' must be a number from {lo:g} to {hi:g}", name)
    return float(v)


def _tool_calls(calls, where: str) -> list[dict]:
    """An assistant message's tool_calls, as the template will see them."""
    if not isinstance(calls, list):
        raise _bad(f"{where} must be an array", where)
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise _bad(f"{where}[{j}] must be {{id, type: function, function: {{name, arguments (a JSON string)}}}}",
                       f"{where}[{j}]")
        out.append({"id": str(c.get("id", "")), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out


def _int(body: dict, name: str, lo: int, hi: int, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"'{name}' must be an integer from {lo} to {hi}", name)
    return v


class OpenAIRoutes:
    def __init__(self, cfg: dict, models: list[dict], clients: dict, limiter, exact=None, semantic=None,
                 shedder=None, breakers=None, classes=None):
        self.cfg, self.limits, self.inf = cfg, cfg["limits"], cfg["inference"]
        self.models = {m["name"]: m for m in models}
        self.clients, self.limiter, self.exact, self.semantic = clients, limiter, exact, semantic
        self.shedder = shedder
        self.classes = classes or Classes(cfg)
        self.breakers = breakers or {}  # "inference:MODEL" -> Breaker: a failing model answers at once
        self.created = int(time.time())
        self.inflight = 0  # generations submitted and not yet ended (Generation counts them)

    def add_to(self, router, guard) -> None:
        router.add("GET", "/v1/models", guard(self.list_models))
        one = guard(self.get_model)
        router.add("GET", "/v1/models/{model}", lambda req, **_: one(req))
        router.add("POST", "/v1/chat/completions", guard(self.chat))
        router.add("POST", "/v1/completions", guard(self.completions))
        router.add("POST", "/v1/embeddings", guard(self.embeddings))

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
        name = path_params(req, 3)[0]
        if name not in self.models:
            raise HttpError(404, f"The model '{name}' does not exist (available: {', '.join(self.models)})",
                            "model_not_found", param="model")
        return json_response(self._model_object(name))

    @staticmethod
    def _known(body: dict, allowed: set) -> None:
        """A 400 naming the first parameter this route does not honour."""
        for k in body:
            if k not in allowed:
                if k in UNSUPPORTED:
                    raise _bad(f"'{k}' is not supported by this server", k, "unsupported_parameter")
                raise _bad(f"Unrecognized request argument supplied: {k}", k, "unknown_parameter")

    # ---- validation ---------------------------------------------------------------------------
    def _model(self, body: dict) -> str:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise _bad("'model' is required: one of " + ", ".join(self.models), "model", "missing_model")
        if name not in self.models:
            raise HttpError(404, f"The model '{name}' does not exist (available: {', '.join(self.models)})",
                            "model_not_found", param="model")
        return name

    def _params(self, body: dict) -> dict:
        n_ctx = self.models[body["model"]]["n_ctx"]
        mt = body.get("max_completion_tokens", body.get("max_tokens"))
        p = {"max_tokens": _int({"max_tokens": mt}, "max_tokens", 1, n_ctx, None),
             "temperature": _number(body, "temperature", 0.0, 2.0, 1.0),
             "top_p": _number(body, "top_p", 0.0, 1.0, 1.0),
             "top_k": _int(body, "top_k", 0, 1 << 20, 0),
             "min_p": _number(body, "min_p", 0.0, 1.0, 0.0),
             "seed": _int(body, "seed", -(1 << 63), (1 << 64) - 1, None),
             # llama.cpp's penalties sampler, over the tokens generated so far
             "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0, 0.0),
             "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0, 0.0),
             "repeat_penalty": _number(body, "repeat_penalty", 0.0, 10.0, 1.0)}
        if p["top_p"] == 0.0:
            raise _bad("'top_p' must be greater than 0", "top_p")
        if p["repeat_penalty"] == 0.0:
            raise _bad("'repeat_penalty' must be greater than 0 (1 = off)", "repeat_penalty")
        if body.get("echo") not in (None, False):
            raise _bad("'echo' is not supported by this server (only false)", "echo", "unsupported_parameter")
        if body.get("suffix") is not None:
            raise _bad("'suffix' is not supported by this server", "suffix", "unsupported_parameter")
        if _int(body, "best_of", 1, 128, 1) != 1:
            raise _bad("'best_of' must be 1", "best_of", "unsupported_parameter")
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise _bad("'user' must be a string", "user")
        try:  # structured outputs: a grammar the sampler enforces (core/llm/structured.py)
            grammar = grammar_for(body.get("response_format"))
        except SchemaError as e:
            raise _bad(str(e), e.param) from None
        if grammar is not None:
            p["grammar"] = grammar
        lp = self._logprobs(body)
        if lp is not None:
            p["logprobs"] = lp
        n = _int(body, "n", 1, self.inf["max_n"], 1)
        if n > 1:
            p["n"] = n
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None:
            if (not isinstance(stop, list) or len(stop) > self.inf["max_stop"]
                    or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop)):
                raise _bad(f"'stop' must be a string or a list of up to {self.inf['max_stop']} non-empty strings",
                           "stop")
            p["stop"] = stop
        bias = body.get("logit_bias")
        if bias is not None:
            if not isinstance(bias, dict) or len(bias) > 1024:
                raise _bad("'logit_bias' must be an object of token id -> bias (at most 1024)", "logit_bias")
            for k, v in bias.items():
                if not (k.isascii() and k.isdigit() and len(k) <= 9) or isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                    raise _bad("'logit_bias' maps token ids (strings of digits) to numbers from -100 to 100",
                               "logit_bias")
            p["logit_bias"] = {k: float(v) for k, v in bias.items()}
        if p["seed"] is not None:
            p["seed"] &= 0xFFFFFFFF
        return p

    @staticmethod
    def _logprobs(body: dict) -> int | None:
        """How many alternatives per token to report (None: no logprobs). Chat: logprobs true plus
        top_logprobs 0..20; completions: logprobs 0..20 (the legacy integer)."""
        if "messages" in body:
            on = body.get("logprobs")
            if on not in (None, True, False):
                raise _bad("'logprobs' must be true or false", "logprobs")
            top = _int(body, "top_logprobs", 0, 20, None)
            if top is not None and not on:
                raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return (top or 0) if on else None
        n = body.get("logprobs")
        if n is None:
            return None
        return _int(body, "logprobs", 0, 20, None)

    def _messages(self, body: dict) -> list[dict]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _bad("'messages' must be a non-empty array", "messages")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                parts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
                    parts.append(part["text"])
                content = "".join(parts)
            elif content is None and m["role"] == "assistant":
                content = ""
            elif not isinstance(content, str):
                raise _bad(f"messages[{i}].content must be a string or an array of text parts",
                           f"messages[{i}].content")
            msg = {"role": m["role"], "content": content}
            if m["role"] == "assistant" and m.get("tool_calls") is not None:
                msg["tool_calls"] = _tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
            if m["role"] == "tool":
                if not isinstance(m.get("tool_call_id"), str):
                    raise _bad(f"messages[{i}].tool_call_id is required for a tool message",
                               f"messages[{i}].tool_call_id")
                msg["tool_call_id"] = m["tool_call_id"]
            out.append(msg)
        return out

    def _stream_flags(self, body: dict) -> tuple[bool, bool]:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("'stream' must be true or false", "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        return stream, bool(opts.get("include_usage"))

    # ---- generation ---------------------------------------------------------------------------
    async def chat(self, req):
        body = self._body(req)
        self._known(body, CHAT_FIELDS)
        model = self._model(body)
        msgs = self._messages(body)
        what, plan = {"messages": msgs}, self._tools(body)
        if plan is not None:
            what["tools"] = plan.tools
        return await self._generate(req, body, model, what, chat=True, tools=plan)

    @staticmethod
    def _tools(body: dict):
        """The request's ToolPlan, else None."""
        if "tools" not in body:
            if body.get("tool_choice") is not None or body.get("parallel_tool_calls") is not None:
                raise _bad("'tool_choice' and 'parallel_tool_calls' need 'tools'",
                           "tool_choice" if body.get("tool_choice") is not None else "parallel_tool_calls")
            return None
        try:
            tools = check_tools(body["tools"])
            choice = check_choice(body.get("tool_choice"), tools)
        except SchemaError as e:
            raise _bad(str(e), e.param) from None
        parallel = body.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise _bad("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
        grammar = grammar_for_calls(tools, choice, parallel)
        if grammar is not None and body.get("response_format") not in (None, {"type": "text"}):
            raise _bad("'response_format' cannot be combined with a forced tool call", "response_format")
        return ToolPlan(tools, choice, grammar)

    async def completions(self, req):
        body = self._body(req)
        self._known(body, COMPLETION_FIELDS)
        model = self._model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _bad("'prompt' must be a string (one prompt per request)", "prompt")
        return await self._generate(req, body, model, {"prompt": prompt}, chat=False)

    async def _cached(self, req, call, body: dict, params: dict, model: str, tenant: str, what: dict, chat: bool):
        """Answer from the exact, then the semantic cache (when the request may be cached and
        Cache-Control allows a lookup); else note in call where to store the answer."""
        if not (reproducible(params) or self.cfg["cache"]["exact_any"]) or params.get("logprobs") is not None:
            return None  # (a cached answer has no log-probabilities to give)
        cc = req.headers.get(b"cache-control", b"").lower()
        lookup, store = b"no-cache" not in cc, b"no-store" not in cc
        if self.exact is not None and self.exact.enabled:
            key = cache_key(tenant, model, "chat" if chat else "completions", dict(body, **what))
            if lookup:
                entry = await self.exact.get(key)
                if entry is not None:
                    return await call.replay(entry, b"exact")
            if store:
                call.store = (key, tenant)
        sem = self.semantic
        where = sem.key(tenant, model, what, body) if sem is not None else None
        if where is not None and sem.policy(tenant)["enabled"]:
            ns, text = where
            if lookup:
                entry = await sem.lookup(ns, text, sem.policy(tenant)["threshold"])
                if entry is not None:
                    return await call.replay(entry, b"semantic")
            if store:
                call.semantic_store = (ns, tenant, text)
        return None

    async def _fallback(self, req, call, body, params, model, tenant, what, chat, cls, refusal):
        """The model may not be asked (its class is shed, its breaker is open, or the request
        waited past its class's queueing deadline). A cached class gets, in order: a stale
        exact-cache answer (RFC 5861 stale-if-error), the nearest semantic-cache entry when the
        route allows approximations (overload.approximate), the model's fallback_text; anything
        else the HttpError refusal() makes. Never the model."""
        sh = self.shedder
        if sh is None or not sh.cached(cls) or call.n > 1 or call.tools is not None:
            raise refusal()  # a cached entry is one plain answer: not n choices, not tool calls
        if self.exact is not None and self.exact.enabled and (reproducible(params) or self.cfg["cache"]["exact_any"]):
            entry = await self.exact.get(cache_key(tenant, model, "chat" if chat else "completions",
                                                   dict(body, **what)), stale=True)
            if entry is not None:
                return await call.replay(entry, b"stale", sh.served(cls, "stale"))
        ov, sem = self.cfg["overload"], self.semantic
        if ov["approximate"] and sem is not None and req.path in ov["approximate_routes"]:
            where = sem.key(tenant, model, what, body)
            if where is not None and sem.policy(tenant)["enabled"]:
                entry = await sem.lookup(where[0], where[1], ov["approximate"], approximate=True)
                if entry is not None:
                    return await call.replay(entry, b"approximate", sh.served(cls, "approximate"))
        text = self.models[model].get("fallback_text")
        if text:
            entry = {"text": text, "finish_reason": "stop",
                     "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
            return await call.replay(entry, b"fallback", sh.served(cls, "fallback"))
        raise refusal()

    async def embeddings(self, req):
        body = self._body(req)
        self._known(body, EMBEDDING_FIELDS)
        model = self._model(body)
        inp = body.get("input")
        if isinstance(inp, str):
            inp = [inp]
        if (not isinstance(inp, list) or not 0 < len(inp) <= 256
                or not all(isinstance(s, str) and s for s in inp)):
            raise _bad("'input' must be a non-empty string or an array of 1 to 256 non-empty strings", "input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise _bad("'encoding_format' must be float or base64", "encoding_format")
        ident = caller(req)
        cls = self.classes.of(req.path, ident.klass, self.models[model].get("class"))
        retry = self.shedder.check(cls, f"inference:{model}") if self.shedder is not None else None
        if retry is not None:  # no cached embeddings: a shed request of any policy gets the 503
            raise self.shedder.reject(cls, retry, f"model {model!r}")
        reservation = await self._reserve(ident, sum(len(s) for s in inp) // 3)
        fut = asyncio.get_running_loop().create_future()

        def on_event(kind, payload):
            if fut.done():
                return
            if kind == protocol.ERR:
                fut.set_exception(protocol.http_error(payload))
            else:
                fut.set_result(payload)
        try:
            self.clients[model].submit(protocol.EMBED, {"input": inp}, on_event)
            res = await fut
        except Unavailable as e:
            self._settle(reservation, 0)
            raise service_unavailable(str(e), "worker_unavailable") from None
        except HttpError:
            self._settle(reservation, 0)
            raise
        self._settle(reservation, res["tokens"])  # embedding tokens count against tokens/minute too
        data = []
        for i, v in enumerate(res["data"]):
            emb = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if fmt == "base64" else v
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = res["tokens"]
        return json_response({"object": "list", "data": data, "model": model,
                              "usage": {"prompt_tokens": n, "total_tokens": n}})

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

    def _body(self, req) -> dict:
        body = parse_json(req, self.limits)
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", None, "invalid_request")
        return body

    async def _generate(self, req, body: dict, model: str, what: dict, chat: bool, tools=None, reply=Generation):
        """reply: the Generation class (or factory) that shapes the answer (/v1/responses has its own)."""
        params = self._params(body)
        stream, include_usage = self._stream_flags(body)
        ident = caller(req)
        tenant, cls = ident.tenant, self.classes.of(req.path, ident.klass, self.models[model].get("class"))
        call = reply(self, model, chat, stream, include_usage, params.get("n", 1))
        if tools is not None and params.get("n", 1) > 1:
            raise _bad("'n' > 1 cannot be combined with tools", "n", "unsupported_parameter")
        if tools is not None:
            if tools.choice != "none":
                call.tools = (tools.grammar is not None, {t["name"] for t in tools.tools})
            if tools.grammar is not None:
                params["grammar"] = tools.grammar
        elif params.get("n", 1) == 1:  # (n choices are not cached: an entry holds one)
            hit = await self._cached(req, call, body, params, model, tenant, what, chat)
            if hit is not None:  # (tool calls are not cached: a cached text has no calls to give)
                return hit
        retry = self.shedder.check(cls, f"inference:{model}") if self.shedder is not None else None
        if retry is not None:
            return await self._fallback(req, call, body, params, model, tenant, what, chat, cls,
                                        lambda: self.shedder.reject(cls, retry, f"model {model!r}"))
        if self.inflight >= self.inf["max_inflight"]:
            raise service_unavailable(f"this worker has {self.inflight} generations in flight "
                                      f"(inference.max_inflight); retry shortly", "too_many_inflight")
        est = sum(len(m["content"]) for m in what["messages"]) // 3 if chat else len(what["prompt"]) // 3
        reservation = await self._reserve(ident, est + params.get("n", 1) * (params["max_tokens"]
                                                                             or self.inf["default_max_tokens"]))
        breaker = self.breakers.get(f"inference:{model}")
        if breaker is not None and not breaker.allow():  # asked last: an allowed call always reaches submit
            self._settle(reservation, 0)
            retry_s = max(1, int(breaker.open_for + 0.999))
            return await self._fallback(req, call, body, params, model, tenant, what, chat, cls, lambda: service_unavailable(
                f"model {model!r} is failing; its circuit breaker is open (retry after {retry_s}s)", "circuit_open",
                retry_after=retry_s))
        msg = dict(what, params=params, tenant=tenant, cls=cls, stream=stream, timeout=self.inf["request_timeout"],
                   window=call.window)
        call.reservation = reservation
        req.on_close = call.client_left
        handler = call.on_event if breaker is None else _counted(call.on_event, breaker)
        try:
            call.rid = self.clients[model].submit(protocol.GEN, msg, handler)
            call.watch(self.inf["idle_timeout"], self.inf["request_timeout"] + self.inf["idle_timeout"])
        except Unavailable as e:
            call.settle(0)
            if breaker is not None:
                breaker.record(False)
            raise service_unavailable(str(e), "worker_unavailable") from None
        try:
            return await call.first
        except HttpError as e:  # refused for load before any byte went out: a cached class's fallback
            if e.code not in LOAD_NOT_FAILURE:
                raise
            again = reply(self, model, chat, stream, include_usage, params.get("n", 1))
            return await self._fallback(req, again, body, params, model, tenant, what, chat, cls, lambda: e)


LOAD_NOT_FAILURE = ("queue_full", "deadline_exceeded")  # overload: the shedding's business, not the breaker's


def _counted(handler, breaker):
    """handler, telling the breaker how the generation ended: a server-side error is a failure
    (not a full queue or a deadline passed in it: a flood of background work must not open the
    breaker on critical requests), anything else a success."""
    t0 = time.monotonic()

    def on_event(kind, payload):
        if kind == protocol.END:
            breaker.record(True, time.monotonic() - t0)
        elif kind == protocol.ERR:
            failed = isinstance(payload, list) and len(payload) > 2 and payload[0] >= 500 \
                and payload[2] not in LOAD_NOT_FAILURE
            breaker.record(not failed)
        handler(kind, payload)
    return on_event
