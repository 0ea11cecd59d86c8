"""Structured outputs: `response_format` to a llama.cpp grammar (GBNF) the sampler enforces.

`json_object` takes llama.cpp's JSON grammar (an object at the root); `json_schema` goes through
the JSON-Schema-to-GBNF converter llama-cpp-python ships. The converter enforces only some
keywords, so a schema is first checked: a keyword that would constrain the output but cannot be
enforced (minimum, multipleOf, uniqueItems, not, …) is refused, naming where it is, rather than
promised and not kept. Annotations (title, description, default, examples…) are fine.
"""
from __future__ import annotations

import json

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

ENFORCED = {"type", "properties", "required", "items", "prefixItems", "enum", "const", "anyOf", "oneOf", "allOf",
            "additionalProperties", "minItems", "maxItems", "minLength", "maxLength", "pattern", "format", "$ref",
            "$defs", "definitions"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly"}
MAX_SCHEMA_BYTES = 65536


class SchemaError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _check(node, path: str) -> None:
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
                _check(sub, f"{path}.{k}.{name}")
        elif k in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(v, list) or not v:
                raise SchemaError(f"{path}.{k} must be a non-empty array", f"{path}.{k}")
            for i, sub in enumerate(v):
                _check(sub, f"{path}.{k}[{i}]")
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            _check(v, f"{path}.{k}")
        elif k == "$ref" and not (isinstance(v, str) and v.startswith("#/")):
            raise SchemaError(f"{path}.$ref: only local references (#/...) are supported", f"{path}.$ref")


# llama-cpp-python's converter lets a JSON string hold raw control characters, which JSON forbids
# (llama.cpp's own converter excludes them): its char rule is narrowed to what a parser accepts
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def schema_grammar(text: str) -> str:
    """The GBNF for a JSON schema (as JSON text), strings restricted to valid JSON."""
    return json_schema_to_gbnf(text).replace(_LOOSE_CHAR, _JSON_CHAR)


def check_schema(schema, path: str) -> None:
    """SchemaError, naming where, for a keyword the grammar cannot enforce."""
    _check(schema, path)


def grammar_for(fmt, where: str = "response_format", inner: str = "response_format.json_schema") -> str | None:
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
    check_schema(schema, f"{inner}.schema")
    try:
        return schema_grammar(text)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise SchemaError(f"the schema cannot be turned into a grammar: {e}", f"{inner}.schema") from None
