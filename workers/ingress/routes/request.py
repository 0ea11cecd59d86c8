"""One validated request object per generation route, built in one place.

`parse_chat`, `parse_completion` and `parse_embeddings` turn a JSON body into a frozen
`GenRequest` / `EmbedRequest`, or raise a 400 (404 for an unknown model) naming the parameter
as the client sent it. Everything downstream (the guard's class, the caches, admission, the
reply) reads the object and never the body again: the exact-cache key, the semantic-cache key
and the downstream's name are computed here once.

`/v1/responses` builds the same object through `parse_chat` with its own `Names`, so a 400
names `max_output_tokens` or `text.format.schema` at the point it is found, not by rewriting
the message afterwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from tidegate.core.cache.exact import cache_key, reproducible
from tidegate.core.cache.semantic_client import semantic_key
from tidegate.workers.ingress.routes.cache_controls import CachePlan, plan_of
from tidegate.core.http.http11 import HttpError
from tidegate.core.http.jsonbody import parse_json
from tidegate.core.llm.structured import Bounds, SchemaError, grammar_for
from tidegate.core.llm.tools import check_choice, check_tools, grammar_for_calls

ROLES = ("system", "developer", "user", "assistant", "tool")
# what each route honours; anything else is a 400 naming it (never silently dropped)
SAMPLING = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "logit_bias", "stream",
            "stream_options", "n", "presence_penalty", "frequency_penalty", "repeat_penalty", "user"}
CHAT_FIELDS = SAMPLING | {"messages", "max_completion_tokens", "response_format", "logprobs", "top_logprobs",
                          "tools", "tool_choice", "parallel_tool_calls", "cache"}
COMPLETION_FIELDS = SAMPLING | {"prompt", "echo", "best_of", "suffix", "logprobs", "cache"}
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "user"}
# OpenAI parameters this server knows and does not implement (yet): refused as unsupported
UNSUPPORTED = {"functions", "function_call", "audio", "modalities", "prediction", "web_search_options",
               "reasoning_effort", "store", "metadata", "service_tier", "dimensions"}


class ToolPlan(NamedTuple):
    tools: list
    choice: str
    grammar: str | None  # set when a call is forced


class Names:
    """The parameter names a client sent, for the chat parameters a route's body maps onto (the
    chat route: the same names). `prefixes`: every parameter under a prefix has one name;
    `tool_fields`: the path from a tool to its function's fields."""

    def __init__(self, renames: dict | None = None, prefixes: dict | None = None, tool_fields: str = ".function"):
        self.renames, self.prefixes, self.tool_fields = renames or {}, prefixes or {}, tool_fields

    def __call__(self, param: str) -> str:
        if param in self.renames:
            return self.renames[param]
        for prefix, name in self.prefixes.items():
            if param.startswith(prefix):
                return name
        return param


CHAT = Names()


@dataclass(frozen=True, slots=True)
class Spec:
    """What parsing needs of the configuration: the models, inference limits, classes, caches."""
    models: dict            # name -> model config
    inf: dict               # the [inference] section
    classes: object         # core/overload/classes.Classes
    exact: bool = False     # the exact cache is on
    exact_any: bool = False  # cache.exact_any: non-reproducible requests are cached too
    semantic: bool = False  # the semantic cache is on
    bounds: Bounds = Bounds()  # what a structured output may ask of llama.cpp (from inf)


@dataclass(frozen=True, slots=True)
class GenRequest:
    """One validated chat or completion request: everything the generation path reads."""
    model: str
    chat: bool              # chat.completions (else text completions)
    path: str               # the route, for the class and the approximate-routes list
    tenant: str
    cls: str                # its traffic class
    params: dict            # sampling parameters as the inference worker takes them
    what: dict              # {"messages": [...], "tools"?: [...]} or {"prompt": "..."}
    stream: bool
    include_usage: bool
    n: int
    tools: ToolPlan | None
    reusable: bool          # its answer may be cached (reproducible, or cache.exact_any)
    exact_key: str | None   # set when it may be looked up in / stored to the exact cache
    semantic_key: tuple | None  # (namespace, text to embed), when the semantic cache may serve it
    downstream: str         # "inference:MODEL": the pressure, shedding and breaker it answers to
    cache: CachePlan = CachePlan()  # what it asks of the caches (its `cache` object, its headers)

    @property
    def prompt_estimate(self) -> int:
        """Prompt tokens before tokenizing (a tokens/minute reservation): ~3 characters a token."""
        if self.chat:
            return sum(len(m["content"]) for m in self.what["messages"]) // 3
        return len(self.what["prompt"]) // 3

    def reserve_tokens(self, default_max_tokens: int) -> int:
        return self.prompt_estimate + self.n * (self.params["max_tokens"] or default_max_tokens)

    def body(self, timeout: float, window: int) -> dict:
        """The GENERATE message for the inference worker."""
        return dict(self.what, params=self.params, tenant=self.tenant, cls=self.cls, stream=self.stream,
                    timeout=timeout, window=window)


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    model: str
    tenant: str
    cls: str
    input: list
    base64: bool
    downstream: str

    @property
    def prompt_estimate(self) -> int:
        return sum(len(s) for s in self.input) // 3


def downstream(model: str) -> str:
    """The name under which a model's pressure, shedding and breaker are known."""
    return f"inference:{model}"


# ---- the routes' parsers ------------------------------------------------------------------------
def parse_body(req, limits: dict) -> dict:
    body = parse_json(req, limits)
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_request")
    return body


def parse_chat(body: dict, ident, path: str, spec: Spec, names: Names = CHAT, known: bool = True,
               headers: dict | None = None) -> GenRequest:
    """known: refuse parameters the chat route does not honour (a translated body is already checked);
    headers: the request's, for its cache controls."""
    if known:
        check_known(body, CHAT_FIELDS)
    model = parse_model(body, spec)
    what = {"messages": _messages(body, names)}
    plan = _tools(body, names, spec.bounds)
    if plan is not None:
        what["tools"] = plan.tools
    return _generation(body, ident, path, spec, names, model, what, plan, chat=True, headers=headers)


def parse_completion(body: dict, ident, path: str, spec: Spec, headers: dict | None = None) -> GenRequest:
    check_known(body, COMPLETION_FIELDS)
    model = parse_model(body, spec)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (one prompt per request)", "prompt")
    return _generation(body, ident, path, spec, CHAT, model, {"prompt": prompt}, None, chat=False, headers=headers)


def parse_embeddings(body: dict, ident, path: str, spec: Spec) -> EmbedRequest:
    check_known(body, EMBEDDING_FIELDS)
    model = parse_model(body, spec)
    inp = body.get("input")
    if isinstance(inp, str):
        inp = [inp]
    if not isinstance(inp, list) or not 0 < len(inp) <= 256 or not all(isinstance(s, str) and s for s in inp):
        raise bad("'input' must be a non-empty string or an array of 1 to 256 non-empty strings", "input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad("'encoding_format' must be float or base64", "encoding_format")
    return EmbedRequest(model, ident.tenant, spec.classes.of(path, ident.klass, spec.models[model].get("class")),
                        inp, fmt == "base64", downstream(model))


def _generation(body, ident, path, spec: Spec, names: Names, model, what, plan, chat: bool,
                headers: dict | None = None) -> GenRequest:
    params = _params(body, spec.models[model]["n_ctx"], spec.inf, names, chat, spec.bounds)
    stream, include_usage = _stream_flags(body)
    n = params.get("n", 1)
    if plan is not None and n > 1:
        raise bad("'n' > 1 cannot be combined with tools", "n", "unsupported_parameter")
    if plan is not None and plan.grammar is not None:
        params["grammar"] = plan.grammar
    tenant, cls = ident.tenant, spec.classes.of(path, ident.klass, spec.models[model].get("class"))
    reusable = reproducible(params) or spec.exact_any
    one = n == 1 and plan is None  # a cache entry is one plain answer: not n choices, not tool calls
    cache = plan_of(body, headers)
    keyed = cache.key_tenant(tenant)  # (a namespace's entries meet only its own)
    shape = {k: v for k, v in body.items() if k != "cache"}
    exact = cache_key(keyed, model, "chat" if chat else "completions", dict(shape, **what)) \
        if one and reusable and spec.exact and cache.exact else None
    semantic = semantic_key(keyed, model, what, shape) if one and spec.semantic and cache.semantic else None
    return GenRequest(model, chat, path, tenant, cls, params, what, stream, include_usage, n, plan, reusable,
                      exact, semantic, downstream(model), cache)


# ---- the parts ----------------------------------------------------------------------------------
def bad(message: str, param: str | None, code: str = "invalid_parameter") -> HttpError:
    return HttpError(400, message, code, param=param)


def check_known(body: dict, allowed: set) -> None:
    """A 400 naming the first parameter a route does not honour."""
    for k in body:
        if k not in allowed:
            if k in UNSUPPORTED:
                raise bad(f"'{k}' is not supported by this server", k, "unsupported_parameter")
            raise bad(f"Unrecognized request argument supplied: {k}", k, "unknown_parameter")


def unknown_model(name: str, spec: Spec) -> HttpError:
    return HttpError(404, f"The model '{name}' does not exist (available: {', '.join(spec.models)})",
                     "model_not_found", param="model")


def parse_model(body: dict, spec: Spec) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise bad("'model' is required: one of " + ", ".join(spec.models), "model", "missing_model")
    if name not in spec.models:
        raise unknown_model(name, spec)
    return name


def number(body: dict, name: str, lo: float, hi: float, default, names: Names = CHAT):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise bad(f"'{names(name)}' must be a number from {lo:g} to {hi:g}", names(name))
    return float(v)


def integer(body: dict, name: str, lo: int, hi: int, default, names: Names = CHAT):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad(f"'{names(name)}' must be an integer from {lo} to {hi}", names(name))
    return v


def _params(body: dict, n_ctx: int, inf: dict, names: Names, chat: bool, bounds: Bounds) -> dict:
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    p = {"max_tokens": integer({"max_tokens": mt}, "max_tokens", 1, n_ctx, None, names),
         "temperature": number(body, "temperature", 0.0, 2.0, 1.0, names),
         "top_p": number(body, "top_p", 0.0, 1.0, 1.0, names),
         "top_k": integer(body, "top_k", 0, 1 << 20, 0),
         "min_p": number(body, "min_p", 0.0, 1.0, 0.0),
         "seed": integer(body, "seed", -(1 << 63), (1 << 64) - 1, None),
         # llama.cpp's penalties sampler, over the tokens generated so far
         "presence_penalty": number(body, "presence_penalty", -2.0, 2.0, 0.0),
         "frequency_penalty": number(body, "frequency_penalty", -2.0, 2.0, 0.0),
         "repeat_penalty": number(body, "repeat_penalty", 0.0, 10.0, 1.0)}
    if p["top_p"] == 0.0:
        raise bad(f"'{names('top_p')}' must be greater than 0", names("top_p"))
    if p["repeat_penalty"] == 0.0:
        raise bad("'repeat_penalty' must be greater than 0 (1 = off)", "repeat_penalty")
    if body.get("echo") not in (None, False):
        raise bad("'echo' is not supported by this server (only false)", "echo", "unsupported_parameter")
    if body.get("suffix") is not None:
        raise bad("'suffix' is not supported by this server", "suffix", "unsupported_parameter")
    if integer(body, "best_of", 1, 128, 1) != 1:
        raise bad("'best_of' must be 1", "best_of", "unsupported_parameter")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad(f"'{names('user')}' must be a string", names("user"))
    try:  # structured outputs: a grammar the sampler enforces (core/llm/structured.py)
        grammar = grammar_for(body.get("response_format"), names("response_format"),
                              names("response_format.json_schema"), bounds)
    except SchemaError as e:
        raise bad(str(e), e.param) from None
    if grammar is not None:
        p["grammar"] = grammar
    lp = _logprobs(body, chat, names)
    if lp is not None:
        p["logprobs"] = lp
    n = integer(body, "n", 1, inf["max_n"], 1)
    if n > 1:
        p["n"] = n
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if (not isinstance(stop, list) or len(stop) > inf["max_stop"]
                or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop)):
            raise bad(f"'stop' must be a string or a list of up to {inf['max_stop']} non-empty strings", "stop")
        p["stop"] = stop
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > 1024:
            raise bad("'logit_bias' must be an object of token id -> bias (at most 1024)", "logit_bias")
        for k, v in bias.items():
            if not (k.isascii() and k.isdigit() and len(k) <= 9) or isinstance(v, bool) \
                    or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise bad("'logit_bias' maps token ids (strings of digits) to numbers from -100 to 100", "logit_bias")
        p["logit_bias"] = {k: float(v) for k, v in bias.items()}
    if p["seed"] is not None:
        p["seed"] &= 0xFFFFFFFF
    return p


def _logprobs(body: dict, chat: bool, names: Names) -> int | None:
    """How many alternatives per token to report (None: no logprobs). Chat: logprobs true plus
    top_logprobs 0..20; completions: logprobs 0..20 (the legacy integer)."""
    if chat:
        on = body.get("logprobs")
        if on not in (None, True, False):
            raise bad(f"'{names('logprobs')}' must be true or false", names("logprobs"))
        top = integer(body, "top_logprobs", 0, 20, None, names)
        if top is not None and not on:
            raise bad(f"'{names('top_logprobs')}' needs '{names('logprobs')}': true", names("top_logprobs"))
        return (top or 0) if on else None
    if body.get("logprobs") is None:
        return None
    return integer(body, "logprobs", 0, 20, None)


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    return stream, bool(opts.get("include_usage"))


def _tool_calls(calls, where: str) -> list[dict]:
    """An assistant message's tool_calls, as the template will see them."""
    if not isinstance(calls, list):
        raise bad(f"{where} must be an array", where)
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise bad(f"{where}[{j}] must be {{id, type: function, function: {{name, arguments (a JSON string)}}}}",
                      f"{where}[{j}]")
        out.append({"id": str(c.get("id", "")), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out


def _messages(body: dict, names: Names) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad(f"'{names('messages')}' must be a non-empty array", names("messages"))
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"{names(where + '.role')} must be one of {', '.join(ROLES)}", names(f"{where}.role"))
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{names(where + '.content')}: only text parts are supported", names(f"{where}.content"))
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and m["role"] == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise bad(f"{names(where + '.content')} must be a string or an array of text parts", names(f"{where}.content"))
        msg = {"role": m["role"], "content": content}
        if m["role"] == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = _tool_calls(m["tool_calls"], names(f"{where}.tool_calls"))
        if m["role"] == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise bad(f"{names(where + '.tool_call_id')} is required for a tool message", names(f"{where}.tool_call_id"))
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _tools(body: dict, names: Names, bounds: Bounds) -> ToolPlan | None:
    """The request's ToolPlan, else None."""
    if "tools" not in body:
        if body.get("tool_choice") is not None or body.get("parallel_tool_calls") is not None:
            raise bad("'tool_choice' and 'parallel_tool_calls' need 'tools'",
                      "tool_choice" if body.get("tool_choice") is not None else "parallel_tool_calls")
        return None
    try:
        tools = check_tools(body["tools"], names.tool_fields, bounds)
        choice = check_choice(body.get("tool_choice"), tools)
        parallel = body.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise bad("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
        grammar = grammar_for_calls(tools, choice, parallel, bounds)
    except SchemaError as e:
        raise bad(str(e), e.param) from None
    if grammar is not None and body.get("response_format") not in (None, {"type": "text"}):
        raise bad(f"'{names('response_format')}' cannot be combined with a forced tool call", names("response_format"))
    return ToolPlan(tools, choice, grammar)
