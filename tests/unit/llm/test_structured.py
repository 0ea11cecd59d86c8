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


# ---- what reaches llama.cpp's grammar parser is bounded ------------------------------------------
def test_grammar_depth_counts_groups_not_brackets_in_literals_or_classes():
    from tidegate.core.llm.structured import grammar_depth
    assert grammar_depth('root ::= ("a" ("b")?)? "(((" [()]') == 2
    assert grammar_depth('root ::= "\\"(" x') == 0
    assert grammar_depth("root ::= x") == 0


def test_counts_patterns_and_depth_are_refused_past_their_bounds_naming_where():
    import pytest
    from tidegate.core.llm.structured import Bounds, SchemaError, check_grammar
    small = Bounds(repeat=10, depth=40, grammar_bytes=100000, pattern_bytes=128)

    def err(schema):
        with pytest.raises(SchemaError) as e:
            grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, bounds=small)
        return e.value.param
    assert err({"type": "object", "properties": {"a": {"type": "string", "maxLength": 11}}}) == \
        "response_format.json_schema.schema.properties.a.maxLength"
    assert err({"type": "array", "items": {"type": "string"}, "minItems": True}) == \
        "response_format.json_schema.schema.minItems"
    assert err({"type": "string", "pattern": "^a{2,11}$"}) == "response_format.json_schema.schema.pattern"
    assert err({"type": "string", "pattern": "a" * 129}) == "response_format.json_schema.schema.pattern"
    assert err({"type": "string", "pattern": "^" + "(" * 45 + "a" + ")" * 45 + "$"}) == \
        "response_format.json_schema.schema"  # within the pattern bounds: the grammar's depth decides
    assert grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "maxLength": 10}}}, bounds=small)
    with pytest.raises(SchemaError):
        check_grammar("root ::= " + "(" * 41 + '"a"' + ")" * 41, "response_format", small)
    with pytest.raises(SchemaError) as e:  # a forced call's grammar too
        grammar_for_calls(check_tools([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"s": {"type": "string", "maxLength": 9}}}}}], bounds=small),
            "required", True, Bounds(repeat=10, depth=5))
    assert e.value.param == "tools"


def test_the_inference_worker_checks_a_grammar_before_llama_cpp_parses_it(tmp_path, demo_model):
    import pytest
    from helpers.llm import batcher
    from tidegate.core.runtime.loop import RequestError
    b = batcher(tmp_path, demo_model, max_grammar_depth=64)
    deep = "root ::= " + "(" * 65 + '"a"' + ")" * 65 + "\n"
    with pytest.raises(RequestError) as e:
        b.submit(b"peer", 1, {"prompt": "x", "params": {"max_tokens": 4, "grammar": deep}, "tenant": "t",
                              "cls": "standard", "stream": False})
    assert e.value.args[0] == 400 and e.value.args[3] == "response_format"
