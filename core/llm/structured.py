"""Structured outputs: `response_format` to a llama.cpp grammar (GBNF) the sampler enforces.

`json_object` takes llama.cpp's JSON grammar (an object at the root); `json_schema` goes through
the JSON-Schema-to-GBNF converter llama-cpp-python ships. The converter enforces only some
keywords, so a schema is first checked: a keyword that would constrain the output but cannot be
enforced (minimum, multipleOf, uniqueItems, not, …) is refused, naming where it is, rather than
promised and not kept. Annotations (title, description, default, examples…) are fine.

What reaches llama.cpp is bounded (`Bounds`, from the [inference] section): its grammar parser is
recursive descent, and a schema's repetition counts unroll into nesting (maxLength 20,000 is a
20,000-deep grammar that overflowed the inference worker's stack and killed it with SIGSEGV).
Counts, pattern sizes, and the finished grammar's size and nesting depth are checked here, in
the ingress, and the grammar again before the inference worker parses it.
"""
from __future__ import annotations

import itertools
import json
import re
from typing import NamedTuple

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

ENFORCED = {"type", "properties", "required", "items", "prefixItems", "enum", "const", "anyOf", "oneOf", "allOf",
            "additionalProperties", "minItems", "maxItems", "minLength", "maxLength", "pattern", "format", "$ref",
            "$defs", "definitions"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly"}
MAX_SCHEMA_BYTES = 65536
COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")
# a grammar's string literals and character classes: their brackets are not nesting
_LITERALS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]')


class Bounds(NamedTuple):
    """What a structured output may ask of llama.cpp's grammar parser."""
    repeat: int = 1024            # inference.max_schema_repeat: a count keyword, a pattern's {n,m}
    depth: int = 2048             # inference.max_grammar_depth: nesting of the finished grammar
    grammar_bytes: int = 262144   # inference.max_grammar_bytes
    pattern_bytes: int = 1024     # inference.max_pattern_bytes

    @classmethod
    def of(cls, inf: dict) -> "Bounds":
        return cls(inf["max_schema_repeat"], inf["max_grammar_depth"], inf["max_grammar_bytes"],
                   inf["max_pattern_bytes"])


DEFAULT_BOUNDS = Bounds()


class SchemaError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _check(node, path: str, bounds: Bounds) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise SchemaError(f"{path} must be a JSON schema (an object)", path)
    for k, v in node.items():
        if k not in ENFORCED and k not in ANNOTATIONS:
            raise SchemaError(f"{path}.{k}: this JSON-schema keyword cannot be enforced while decoding", f"{path}.{k}")
        if k in ("properties", "$defs", "definitions"):
            if not isinstance(v, dict):
                raise SchemaError(f"{path}.{k} must be an object", f"{path}.{k}")
            for name, sub in v.items():
                _check(sub, f"{path}.{k}.{name}", bounds)
        elif k in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(v, list) or not v:
                raise SchemaError(f"{path}.{k} must be a non-empty array", f"{path}.{k}")
            for i, sub in enumerate(v):
                _check(sub, f"{path}.{k}[{i}]", bounds)
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            _check(v, f"{path}.{k}", bounds)
        elif k == "$ref" and not (isinstance(v, str) and v.startswith("#/")):
            raise SchemaError(f"{path}.$ref: only local references (#/...) are supported", f"{path}.$ref")
        elif k in COUNTS and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= bounds.repeat):
            raise SchemaError(f"{path}.{k} must be an integer from 0 to {bounds.repeat} (inference.max_schema_repeat:"
                              " each unit is a step of the grammar)", f"{path}.{k}")
        elif k == "pattern":
            _check_pattern(v, f"{path}.pattern", bounds)


def _check_pattern(v, path: str, bounds: Bounds) -> None:
    if not isinstance(v, str) or len(v.encode()) > bounds.pattern_bytes:
        raise SchemaError(f"{path} must be a string of at most {bounds.pattern_bytes} bytes "
                          "(inference.max_pattern_bytes)", path)
    for m in QUANTIFIER.finditer(v):
        if any(n and int(n) > bounds.repeat for n in m.groups()):
            raise SchemaError(f"{path}: a repetition count over {bounds.repeat} (inference.max_schema_repeat)", path)


def grammar_depth(gbnf: str) -> int:
    """How deep a GBNF grammar's parentheses nest (what llama.cpp's parser recurses on)."""
    marks = re.findall(r"[()]", _LITERALS.sub("", gbnf))
    return max(itertools.accumulate(1 if c == "(" else -1 for c in marks), default=0)


def check_grammar(gbnf: str, where: str, bounds: Bounds = DEFAULT_BOUNDS) -> str:
    """gbnf, when llama.cpp may be given it; else SchemaError naming `where` (what asked for it)."""
    if len(gbnf) > bounds.grammar_bytes:
        raise SchemaError(f"{where}: its grammar would be {len(gbnf)} bytes, over {bounds.grammar_bytes} "
                          "(inference.max_grammar_bytes)", where)
    depth = grammar_depth(gbnf)
    if depth > bounds.depth:
        raise SchemaError(f"{where}: its grammar would nest {depth} deep, over {bounds.depth} "
                          "(inference.max_grammar_depth)", where)
    return gbnf


# llama-cpp-python's converter lets a JSON string hold raw control characters, which JSON forbids
# (llama.cpp's own converter excludes them): its char rule is narrowed to what a parser accepts
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def schema_grammar(text: str) -> str:
    """The GBNF for a JSON schema (as JSON text), strings restricted to valid JSON."""
    return json_schema_to_gbnf(text).replace(_LOOSE_CHAR, _JSON_CHAR)


def check_schema(schema, path: str, bounds: Bounds = DEFAULT_BOUNDS) -> None:
    """SchemaError, naming where, for a keyword the grammar cannot enforce or a count past bounds."""
    _check(schema, path, bounds)


def grammar_for(fmt, where: str = "response_format", inner: str = "response_format.json_schema",
                bounds: Bounds = DEFAULT_BOUNDS) -> str | None:
    """The GBNF for a response_format, None for plain text; SchemaError names what is wrong, as
    `where` (the format) and `inner` (its json_schema) name them to the client."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise SchemaError(f"'{where}' must be {{\"type\": \"text\" | \"json_object\" | \"json_schema\"}}", where)
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return JSON_GBNF
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or "schema" not in spec:
        raise SchemaError(f"'{inner}' needs a name and a schema", inner)
    schema = spec["schema"]
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the schema is larger than {MAX_SCHEMA_BYTES} bytes", f"{inner}.schema")
    check_schema(schema, f"{inner}.schema", bounds)
    try:
        gbnf = schema_grammar(text)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise SchemaError(f"the schema cannot be turned into a grammar: {e}", f"{inner}.schema") from None
    return check_grammar(gbnf, f"{inner}.schema", bounds)
