"""Grammars from JSON schemas: strings may not hold raw control characters (JSON forbids them;
llama-cpp-python's converter allows them, so a random-weight model could emit unparseable JSON)."""
import re

from tidegate.core.llm.structured import grammar_for
from tidegate.core.llm.tools import check_tools, grammar_for_calls


def _char_rules(gbnf: str) -> list[str]:
    return [line for line in gbnf.splitlines() if re.match(r"\s*char\s*::=", line)]


def test_schema_strings_exclude_control_characters():
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string", "maxLength": 3}}}}}
    tools = check_tools([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string"}}}}}])
    for gbnf in (grammar_for(fmt), grammar_for_calls(tools, "required", True)):
        rules = _char_rules(gbnf)
        assert rules, gbnf
        assert all(r"\x00-\x1F" in r and r"\x7F" in r for r in rules), rules
