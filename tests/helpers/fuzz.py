"""Hostile requests for every route, as hypothesis strategies, and what every answer must be:
no 5xx but a 503 with Retry-After, and every error in the OpenAI shape. Shared by
tests/system/test_fuzz.py (a short budget) and bench/fuzz.py (a long one)."""
from __future__ import annotations

import json
import socket

from hypothesis import strategies as st

# JSON values, with the shapes that break parsers and validators: unicode digits and keys,
# huge and negative numbers, floats at the edges, deep nesting
ODD_STRINGS = st.sampled_from(["", "²", "١٢٣", "0x10", "1e400", "-0", "\0", "\ud7ff", "😀" * 64, "a" * 5000,
                               "𝟙𝟚𝟛", " 12", "NaN", "null", "../..", "%00", "\u202e", "k" * 300])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40), ODD_STRINGS)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.one_of(st.text(max_size=10), ODD_STRINGS), inner, max_size=4), max_leaves=20)
DEEP = st.integers(1, 400).map(lambda n: "[" * n + "1" + "]" * n)

MODEL = "gpt-4o"  # the fuzzed daemon serves the demo model under a name OpenAI's examples use
PARAMS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "seed", "stop", "logit_bias", "stream", "stream_options", "n", "presence_penalty",
          "frequency_penalty", "user", "tools", "response_format", "input", "encoding_format", "logprobs"]


# grammar-bearing inputs: what becomes a llama.cpp grammar (the inference worker's native parser
# overflowed its stack on a 20,000-deep one): counts past any sane bound, nested patterns, schemas
COUNT = st.one_of(st.integers(0, 8), st.integers(0, 40000), JSON)
PATTERN = st.one_of(st.integers(1, 3000).map(lambda n: "^" + "(" * n + "a" + ")" * n + "$"),
                    st.tuples(st.integers(0, 50000), st.integers(0, 50000)).map(lambda t: f"^a{{{t[0]},{t[1]}}}$"),
                    st.text(max_size=40), ODD_STRINGS)
SCHEMA = st.recursive(
    st.one_of(st.fixed_dictionaries({"type": st.just("string")}, optional={"maxLength": COUNT, "minLength": COUNT,
                                                                             "pattern": PATTERN}),
              st.fixed_dictionaries({"type": st.sampled_from(["integer", "number", "boolean"])}), JSON),
    lambda inner: st.one_of(
        st.fixed_dictionaries({"type": st.just("array"), "items": inner}, optional={"minItems": COUNT,
                                                                                   "maxItems": COUNT}),
        st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(
            st.text(max_size=8), inner, max_size=3)}),
        st.fixed_dictionaries({"anyOf": st.lists(inner, min_size=1, max_size=3)})),
    max_leaves=8)


@st.composite
def grammar_params(draw) -> dict:
    """response_format with a schema, or tools whose parameters are one (a forced call)."""
    schema = draw(SCHEMA)
    if draw(st.booleans()):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    return {"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
            "tool_choice": draw(st.sampled_from(["required", "auto", {"type": "function", "function": {"name": "f"}}]))}


@st.composite
def llm_body(draw):
    body = draw(st.dictionaries(st.sampled_from(PARAMS), JSON, max_size=6))
    if draw(st.booleans()):
        body["model"] = MODEL
    if draw(st.booleans()):
        body["messages"] = draw(st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": JSON}), max_size=3))
    if "max_tokens" not in body or draw(st.booleans()):
        body["max_tokens"] = draw(st.one_of(st.integers(1, 4), JSON))  # valid ones stay short: no long generations
    if draw(st.booleans()):
        body["logit_bias"] = draw(st.dictionaries(st.one_of(ODD_STRINGS, st.integers(0, 40000).map(str)),
                                                  st.one_of(st.integers(-200, 200), JSON), max_size=3))
    if draw(st.integers(0, 2)) == 0:
        body.update(draw(grammar_params()))
    return body


@st.composite
def responses_body(draw):
    """/v1/responses: input as text or items (messages, calls, outputs, odd ones), tools, formats."""
    body = draw(st.dictionaries(st.sampled_from(["instructions", "temperature", "top_p", "tools", "tool_choice",
                                                 "text", "include", "top_logprobs", "metadata", "store",
                                                 "parallel_tool_calls", "stream", "truncation", "x"]), JSON,
                                max_size=3))
    if draw(st.booleans()):
        body["model"] = MODEL
    item = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "developer", "assistant", "x"]),
                                            "content": JSON}),
                     st.fixed_dictionaries({"type": st.sampled_from(["function_call", "function_call_output",
                                                                     "message", "input_image", "x"])},
                                           optional={"call_id": JSON, "name": JSON, "arguments": JSON,
                                                     "output": JSON, "content": JSON, "role": JSON}))
    body["input"] = draw(st.one_of(st.text(max_size=40), st.lists(item, max_size=3), JSON))
    body["max_output_tokens"] = draw(st.one_of(st.integers(1, 4), JSON))  # valid ones stay short
    if draw(st.integers(0, 2)) == 0:  # a grammar-bearing format (text.format) or function tool
        schema = draw(SCHEMA)
        if draw(st.booleans()):
            body["text"] = {"format": {"type": "json_schema", "name": "x", "schema": schema}}
        else:
            body["tools"], body["tool_choice"] = [{"type": "function", "name": "f", "parameters": schema}], "required"
    return body


@st.composite
def event_body(draw):
    ev = st.fixed_dictionaries({"key": st.one_of(st.text(max_size=300), ODD_STRINGS), "type": st.text(max_size=70)},
                               optional={"ts": JSON, "payload": JSON, "extra": JSON})
    return draw(st.one_of(ev, st.lists(ev, max_size=5), JSON))


ID = st.one_of(st.sampled_from(["u1", "m2", "u9999", "nobody"]), st.text(max_size=300), ODD_STRINGS, JSON)


@st.composite
def predict_body(draw):
    """A prediction for the demo's fraud model (tidegate demo features): right, wrong or odd parts."""
    body = {}
    if draw(st.integers(0, 5)):
        body["entities"] = draw(st.one_of(st.dictionaries(st.sampled_from(["user", "merchant", "shop", "", "²"]), ID,
                                                          max_size=3), JSON))
    if draw(st.integers(0, 5)):
        number = st.one_of(st.floats(allow_nan=False), st.integers(-(1 << 70), 1 << 70), JSON)
        body["features"] = draw(st.one_of(st.dictionaries(st.sampled_from(["amount", "hour", "x"]), number,
                                                          max_size=3), JSON))
    if not draw(st.integers(0, 6)):
        body[draw(st.text(max_size=8))] = draw(JSON)
    return body


ROUTES = {
    "predict": ("POST", "/v1/predict/fraud", st.one_of(predict_body(), JSON)),
    "predict-batch": ("POST", "/v1/predict/fraud/batch", st.one_of(st.fixed_dictionaries(
        {"instances": st.lists(predict_body(), max_size=4)}), st.lists(predict_body(), max_size=2), JSON)),
    "chat": ("POST", "/v1/chat/completions", llm_body()),
    "completions": ("POST", "/v1/completions", llm_body().map(lambda b: {**b, "prompt": b.get("prompt", "hi")})),
    "embeddings": ("POST", "/v1/embeddings", llm_body().map(lambda b: {**b, "input": b.get("input", "hi")})),
    "responses": ("POST", "/v1/responses", responses_body()),
    "events": ("POST", "/v1/events", event_body()),
    "sessions": ("POST", "/v1/sessions", st.one_of(st.fixed_dictionaries({"user": JSON, "attributes": JSON}), JSON)),
    "echo": ("POST", "/v1/echo", JSON),
}


@st.composite
def case(draw):
    """(raw request bytes, how many requests it holds): a route, a body (JSON, deeply nested or
    not JSON at all), odd or duplicated headers, and sometimes several requests pipelined."""
    name = draw(st.sampled_from(sorted(ROUTES) + ["views", "features", "predict-info", "models", "session-patch"]))
    segment = draw(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)).replace(
        "%", "%25").replace("/", "%2F").replace(" ", "%20").replace("?", "%3F").replace("#", "%23")
    if name == "views":
        method, path, body = "GET", "/v1/views/" + draw(st.sampled_from(["n", "x"])) + "/" + segment, None
    elif name == "features":
        method, path, body = "GET", "/v1/features/" + draw(st.sampled_from(["user", "merchant", "x"])) + "/" + segment, None
    elif name == "predict-info":
        method, path, body = "GET", "/v1/predict/" + draw(st.sampled_from(["fraud", "recommend", segment])), None
    elif name == "models":
        method, path, body = "GET", "/v1/models", None
    elif name == "session-patch":
        method, path, body = "PATCH", "/v1/sessions/current", draw(JSON)
    else:
        method, path, strategy = ROUTES[name]
        body = draw(strategy)
    raw_body = b""
    if body is not None:
        kind = draw(st.sampled_from(["json", "json", "deep", "garbage", "ndjson"]))
        raw_body = {"json": lambda: json.dumps(body).encode(),
                    "deep": lambda: draw(DEEP).encode(),
                    "garbage": lambda: draw(st.binary(max_size=200)),
                    "ndjson": lambda: b"\n".join(json.dumps(x).encode() for x in (body if isinstance(body, list)
                                                                               else [body]))}[kind]()
    headers = [("Host", "t")]
    if raw_body or body is not None:
        headers.append(("Content-Type", draw(st.sampled_from(["application/json", "application/x-ndjson",
                                                              "text/plain", "application/xml", "application/json; x=1"]))))
        headers.append(("Content-Length", str(len(raw_body))))
    for _ in range(draw(st.integers(0, 3))):
        headers.append(draw(st.sampled_from([("X-Request-Id", "\u00ff" * 200), ("Authorization", "Bearer tgs-bad"),
                                             ("Authorization", "Basic x"), ("Cache-Control", "no-cache, no-store"),
                                             ("Expect", "100-continue"), ("Accept", "*/*"), ("X-Api-Key", ""),
                                             ("Content-Type", "application/json")])))
    one = (f"{method} {path} HTTP/1.1\r\n".encode()
           + b"".join(f"{k}: {v}\r\n".encode("utf-8", "replace") for k, v in headers) + b"\r\n" + raw_body)
    n = draw(st.integers(1, 3))
    return one * n + b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", n + 1


def exchange(port: int, data: bytes, timeout: float = 30.0) -> list[tuple[int, dict, bytes]]:
    """Send raw bytes; every (status, headers, body) the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return parse_replies(buf)


def parse_replies(buf: bytes) -> list[tuple[int, dict, bytes]]:
    out = []
    while b"\r\n\r\n" in buf:
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if status == 100:
            continue
        if headers.get("transfer-encoding") == "chunked":  # SSE: read the chunks
            body = b""
            while True:
                size_line, _, buf = buf.partition(b"\r\n")
                size = int(size_line or b"0", 16)
                if size == 0:
                    buf = buf[2:]
                    break
                body, buf = body + buf[:size], buf[size + 2:]
        else:
            n = int(headers.get("content-length", 0))
            body, buf = buf[:n], buf[n:]
        out.append((status, headers, body))
    return out


def problems(replies: list) -> list[str]:
    """What is wrong with these answers (empty: all fine)."""
    bad = []
    if not replies:
        return ["no answer at all"]
    for status, headers, body in replies:
        if status >= 500 and not (status == 503 and "retry-after" in headers):
            bad.append(f"{status} {body[:200]!r}")
        if status >= 400:
            try:
                err = json.loads(body)["error"]
                assert {"type", "message", "param", "code"} <= err.keys() and isinstance(err["message"], str)
            except Exception:
                bad.append(f"{status} error not in the OpenAI shape: {body[:200]!r}")
    return bad
