"""Tool calls: `tools`, `tool_choice` and `parallel_tool_calls` as OpenAI defines them.

The tools reach the model through its chat template (`tools`, for templates that take them) or,
for one that does not, a system message listing them. With `tool_choice` "required" or a named
function, decoding is constrained by a grammar built from the functions' JSON schemas, so the
output is always a well-formed call (a JSON array of calls when parallel calls are allowed)
whose arguments validate: true even for the random-weight demo model. With "auto" the output is
parsed for the common template syntax (`<tool_call>{…}</tool_call>`, or a bare
`{"name": …, "arguments": …}`); with "none" the tools are shown and never called.
"""
from __future__ import annotations

import json
import os
import re

import orjson


from tidegate.core.llm.structured import DEFAULT_BOUNDS, Bounds, SchemaError, check_grammar, check_schema, schema_grammar

MAX_TOOLS, MAX_PARALLEL = 64, 4  # parallel: at most this many calls in one answer
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"


def tagged_calls(text: str) -> list[str]:
    """The {...} bodies of <tool_call> ... </tool_call> blocks, in one linear pass (the regex it
    replaces backtracked quadratically: 12 s on the ingress loop for 128 KB of model output)."""
    out, at = [], 0
    while True:
        start = text.find(OPEN_TAG, at)
        if start < 0:
            return out
        end = text.find(CLOSE_TAG, start + len(OPEN_TAG))
        if end < 0:
            return out
        body = text[start + len(OPEN_TAG):end].strip()
        if body.startswith("{") and body.endswith("}"):
            out.append(body)
        at = end + len(CLOSE_TAG)


def check_tools(tools, fields: str = ".function", bounds: Bounds = DEFAULT_BOUNDS) -> list[dict]:
    """[{name, description, parameters}] from the request's tools; SchemaError names what is wrong
    (`fields`: the path from a tool to its function's fields, as the client's API spells it)."""
    if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
        raise SchemaError(f"'tools' must be an array of 1 to {MAX_TOOLS} tools", "tools")
    out, seen = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise SchemaError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name) or name in seen:
            raise SchemaError(f"tools[{i}]{fields}.name must be 1 to 64 letters, digits, _ or -, and unique",
                              f"tools[{i}]{fields}.name")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        check_schema(params, f"tools[{i}]{fields}.parameters", bounds)
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise SchemaError(f"tools[{i}]{fields}.description must be a string", f"tools[{i}]{fields}.description")
        out.append({"name": name, "description": desc, "parameters": params})
    return out


def check_choice(choice, tools: list[dict]) -> str:
    """"none" | "auto" | "required" | a function's name."""
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise SchemaError("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
                          "{\"name\": ...}}", "tool_choice")
    if name not in {t["name"] for t in tools}:
        raise SchemaError(f"'tool_choice' names {name!r}, which is not in tools", "tool_choice")
    return name


def _call_schema(t: dict) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]}}


def grammar_for_calls(tools: list[dict], choice: str, parallel: bool, bounds: Bounds = DEFAULT_BOUNDS) -> str | None:
    """The GBNF that forces a call ("required" or a named function), else None; SchemaError
    (naming tools) when that grammar is past bounds."""
    if choice in ("none", "auto"):
        return None
    chosen = [t for t in tools if choice == "required" or t["name"] == choice]
    one = _call_schema(chosen[0]) if len(chosen) == 1 else {"anyOf": [_call_schema(t) for t in chosen]}
    schema = {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL} if parallel and \
        choice == "required" else one
    try:
        gbnf = schema_grammar(json.dumps(schema))
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise SchemaError(f"the tools' parameters cannot be turned into a grammar: {e}", "tools") from None
    return check_grammar(gbnf, "tools", bounds)


def parse_calls(text: str, forced: bool, names: set) -> list[dict] | None:
    """The calls in a model's output ([{id, type, function: {name, arguments}}]), or None for a
    plain answer. forced: the output is the grammar's JSON (a call or an array of calls)."""
    found = []
    if forced:  # (orjson: nesting past 1024 is a ValueError, where json's RecursionError got through)
        v = orjson.loads(text)
        found = v if isinstance(v, list) else [v]
    else:
        blocks = tagged_calls(text)
        stripped = text.strip()
        candidates = blocks or ([stripped] if stripped.startswith("{") and stripped.endswith("}") else [])
        for c in candidates:
            try:
                v = orjson.loads(c)
            except ValueError:
                return None
            found.append(v)
    calls = []
    for v in found:
        if not isinstance(v, dict) or v.get("name") not in names:
            return None
        args = v.get("arguments", v.get("parameters", {}))
        calls.append({"id": "call_" + os.urandom(12).hex(), "type": "function",
                      "function": {"name": v["name"], "arguments": _arguments(args)}})
    return calls or None


def _arguments(args) -> str:
    try:
        return json.dumps(args, ensure_ascii=False)
    except RecursionError:  # (nested past json's recursion limit: orjson writes up to its 1024)
        return orjson.dumps(args).decode()


def system_prompt(tools: list[dict]) -> str:
    """For a chat template that takes no tools: what the model is told instead."""
    listing = json.dumps([{"type": "function", "function": t} for t in tools], ensure_ascii=False)
    return ("You may call these functions. To call one, answer with <tool_call>{\"name\": NAME, \"arguments\": "
            "{...}}</tool_call> and nothing else.\n" + listing)
