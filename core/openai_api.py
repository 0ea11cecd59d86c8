"""The OpenAI-compatible routes of an ingress worker.

    GET  /v1/models             POST /v1/chat/completions
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
import os
import time

import numpy as np
import orjson

from tidegate.core.exact_cache import cache_key, reproducible
from tidegate.core.http11 import HttpError, Stream, json_response
from tidegate.core.worker_client import Unavailable
from tidegate.core.jsonbody import parse_json

ROLES = ("system", "developer", "user", "assistant", "tool")
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


def _int(body: dict, name: str, lo: int, hi: int, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"'{name}' must be an integer from {lo} to {hi}", name)
    return v


class OpenAIRoutes:
    def __init__(self, cfg: dict, models: list[dict], clients: dict, limiter, exact=None, semantic=None):
        self.cfg, self.limits, self.inf = cfg, cfg["limits"], cfg["inference"]
        self.models = {m["name"]: m for m in models}
        self.clients, self.limiter, self.exact, self.semantic = clients, limiter, exact, semantic
        self.created = int(time.time())

    def add_to(self, router, guard) -> None:
        router.add("GET", "/v1/models", guard(self.list_models))
        router.add("POST", "/v1/chat/completions", guard(self.chat))
        router.add("POST", "/v1/completions", guard(self.completions))
        router.add("POST", "/v1/embeddings", guard(self.embeddings))

    # ---- /v1/models ---------------------------------------------------------------------------
    def list_models(self, req):
        data = []
        for name, m in self.models.items():
            item = {"id": name, "object": "model", "created": self.created,
                    "owned_by": "tidegate" if m["path"] else "tidegate-demo"}
            if not m["path"]:
                item["description"] = DEMO_NOTE
            data.append(item)
        return json_response({"object": "list", "data": data})

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
             "seed": _int(body, "seed", -(1 << 63), (1 << 64) - 1, None)}
        if p["top_p"] == 0.0:
            raise _bad("'top_p' must be greater than 0", "top_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if _number(body, name, -2.0, 2.0, 0.0) != 0.0:
                raise _bad(f"'{name}' is not supported by this server (only 0)", name, "unsupported_parameter")
        if _int(body, "n", 1, 128, 1) != 1:
            raise _bad("'n' must be 1: one choice per request", "n", "unsupported_parameter")
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
                if not k.isdigit() or isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                    raise _bad("'logit_bias' maps token ids (strings of digits) to numbers from -100 to 100",
                               "logit_bias")
            p["logit_bias"] = {k: float(v) for k, v in bias.items()}
        if p["seed"] is not None:
            p["seed"] &= 0xFFFFFFFF
        return p

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
            out.append({"role": m["role"], "content": content})
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
        model = self._model(body)
        msgs = self._messages(body)
        return await self._generate(req, body, model, {"messages": msgs}, chat=True)

    async def completions(self, req):
        body = self._body(req)
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
        if not (reproducible(params) or self.cfg["cache"]["exact_any"]):
            return None
        cc = req.headers.get(b"cache-control", b"").lower()
        lookup, store = b"no-cache" not in cc, b"no-store" not in cc
        if self.exact is not None and self.exact.enabled:
            key = cache_key(tenant, model, "chat" if chat else "completions", dict(body, **what))
            if lookup:
                found = asyncio.get_running_loop().create_future()
                self.exact.get(key, found.set_result)
                entry = await found
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

    async def embeddings(self, req):
        body = self._body(req)
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
        fut = asyncio.get_running_loop().create_future()

        def on_event(kind, payload):
            if fut.done():
                return
            if kind == "err":
                status, message, code, param = payload
                fut.set_exception(HttpError(status, message, code, param=param,
                                            headers=[(b"retry-after", b"1")] if status == 503 else None))
            else:
                fut.set_result(payload)
        try:
            self.clients[model].submit("embed", {"input": inp}, on_event)
        except Unavailable as e:
            raise HttpError(503, str(e), "worker_unavailable", headers=[(b"retry-after", b"1")]) from None
        res = await fut
        data = []
        for i, v in enumerate(res["data"]):
            emb = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if fmt == "base64" else v
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = res["tokens"]
        return json_response({"object": "list", "data": data, "model": model,
                              "usage": {"prompt_tokens": n, "total_tokens": n}})

    def _body(self, req) -> dict:
        body = parse_json(req, self.limits)
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", None, "invalid_request")
        return body

    async def _generate(self, req, body: dict, model: str, what: dict, chat: bool):
        params = self._params(body)
        stream, include_usage = self._stream_flags(body)
        ident = req.identity
        tenant = ident.tenant if ident is not None else "anonymous"
        cls = ident.klass if ident is not None else "standard"
        call = _Call(self, model, chat, stream, include_usage)
        hit = await self._cached(req, call, body, params, model, tenant, what, chat)
        if hit is not None:
            return hit
        reservation = None
        if self.limiter.token_limits and ident is not None:  # tokens/minute: reserve, settle on the answer
            est = sum(len(m["content"]) for m in what["messages"]) // 3 if chat else len(what["prompt"]) // 3
            reservation = self.limiter.reserve(ident, est + (params["max_tokens"] or self.inf["default_max_tokens"]))
            if asyncio.isfuture(reservation):
                reservation = await reservation
        msg = dict(what, params=params, tenant=tenant, cls=cls, stream=stream, timeout=self.inf["request_timeout"])
        call.reservation = reservation
        req.on_close = call.client_left
        try:
            call.rid = self.clients[model].submit("gen", msg, call.on_event)
        except Unavailable as e:
            call.settle(0)
            raise HttpError(503, str(e), "worker_unavailable", headers=[(b"retry-after", b"1")]) from None
        return await call.first


class _Call:
    """One generation in flight: turns inference events into the HTTP answer."""

    def __init__(self, api: OpenAIRoutes, model: str, chat: bool, stream: bool, include_usage: bool):
        self.api, self.model, self.chat, self.stream, self.include_usage = api, model, chat, stream, include_usage
        self.reservation = None
        self.store = None  # (key, tenant): put the answer in the exact cache when it ends well
        self.semantic_store = None  # (namespace, tenant, text): and in the semantic cache
        self.cache_header = [(b"x-tidegate-cache", b"miss")]
        self.first = asyncio.get_running_loop().create_future()
        self.id = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
        self.created = int(time.time())
        self.sse: Stream | None = None
        self.rid = 0
        self._full_text = ""  # streamed deltas so far, for the exact cache

    async def replay(self, entry: dict, kind: bytes):
        """Answer from a cached entry, streamed or not, exactly as a generation would."""
        self.cache_header = [(b"x-tidegate-cache", kind)]
        self.store = self.semantic_store = None  # a replayed answer is not stored again
        usage = dict(entry["usage"], cached_tokens=entry["usage"]["prompt_tokens"])
        if self.stream:
            self.on_event("d", entry["text"])
            self.on_event("end", dict(entry, text="", usage=usage))
        else:
            self.on_event("end", dict(entry, usage=usage))
        return await self.first

    def settle(self, used: int) -> None:
        if self.reservation is not None:
            self.api.limiter.settle(self.reservation, used)
            self.reservation = None

    def on_event(self, kind: str, payload) -> None:
        if kind == "err":
            status, message, code, param = payload
            self.settle(0)
            err = HttpError(status, message, code, param=param,
                            headers=[(b"retry-after", b"1")] if status == 503 else None)
            if not self.first.done():
                self.first.set_exception(err)
            elif self.sse is not None:  # mid-stream: an error event, then the end
                self.sse.write(b"data: " + orjson.dumps(err.body()) + b"\n\n")
                self.sse.end()
            return
        if kind == "end" and payload["finish_reason"] in ("stop", "length") and (self.store or self.semantic_store):
            entry = {"text": self._full_text + payload["text"], "finish_reason": payload["finish_reason"],
                     "usage": payload["usage"]}
            if self.store is not None:
                self.api.exact.put(self.store[0], self.store[1], entry)
            if self.semantic_store is not None:
                ns, tenant, text = self.semantic_store
                self.api.semantic.insert(ns, tenant, text, entry)
        if not self.stream:
            if kind == "end":
                self.settle(payload["usage"]["total_tokens"])
                if not self.first.done():
                    self.first.set_result(json_response(self._whole(payload), headers=self.cache_header))
            return
        if kind == "d" and (self.store or self.semantic_store):
            self._full_text += payload
        if self.sse is None:
            self.sse = Stream(on_close=self.client_left, headers=self.cache_header)
            if not self.first.done():
                self.first.set_result(self.sse)
            if self.chat:  # the first chat chunk announces the role
                self._chunk({"role": "assistant", "content": ""}, None)
        if kind == "d":
            self._chunk(payload, None)
        elif kind == "end":
            self.settle(payload["usage"]["total_tokens"])
            if payload["text"]:
                self._chunk(payload["text"], None)
            self._chunk(None, payload["finish_reason"])
            if self.include_usage:
                self.sse.write(b"data: " + orjson.dumps(self._envelope([], _usage(payload["usage"]))) + b"\n\n")
            self.sse.write(b"data: [DONE]\n\n")
            self.sse.end()

    def client_left(self) -> None:
        """The client went away: stop its sequence at the next step. What was reserved stays
        spent (part of it was generated, and a refund must never exceed what was unused)."""
        self.api.clients[self.model].cancel(self.rid)
        self.reservation = None

    def _envelope(self, choices: list, usage=None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def _chunk(self, delta, finish) -> None:
        if self.chat:
            d = delta if isinstance(delta, dict) else ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        self.sse.write(b"data: " + orjson.dumps(self._envelope([choice])) + b"\n\n")

    def _whole(self, end: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": end["text"]}, "logprobs": None,
                      "finish_reason": end["finish_reason"]}
        else:
            choice = {"index": 0, "text": end["text"], "logprobs": None, "finish_reason": end["finish_reason"]}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": _usage(end["usage"])}


def _usage(u: dict) -> dict:
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"], "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}
