"""Tool calls, pure logic: what a model's output parses to, and what a request may ask."""
import json

import pytest

from tidegate.core.llm.structured import SchemaError
from tidegate.core.llm.tools import check_choice, check_tools, grammar_for_calls, parse_calls

F = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "x": {"type": "string"}}, "required": ["x"]}}}


def test_auto_finds_tagged_or_bare_calls_and_nothing_else():
    calls = parse_calls('Sure. <tool_call>{"name": "f", "arguments": {"x": "1"}}</tool_call>', False, {"f"})
    assert [c["function"]["name"] for c in calls] == ["f"] and json.loads(calls[0]["function"]["arguments"]) == {"x": "1"}
    assert parse_calls('{"name": "f", "parameters": {"x": "2"}}', False, {"f"})[0]["function"]["arguments"] == '{"x": "2"}'
    assert parse_calls("just text", False, {"f"}) is None
    assert parse_calls('{"name": "g", "arguments": {}}', False, {"f"}) is None  # not a declared tool
    assert parse_calls("<tool_call>{not json}</tool_call>", False, {"f"}) is None


def test_forced_output_is_a_call_or_an_array_of_them():
    two = parse_calls('[{"name": "f", "arguments": {"x": "a"}}, {"name": "f", "arguments": {"x": "b"}}]', True, {"f"})
    assert len(two) == 2 and two[0]["id"] != two[1]["id"]
    with pytest.raises(ValueError):
        parse_calls('[{"name": "f", "arg', True, {"f"})  # cut by max_tokens: the caller returns the text


def test_choice_and_grammar():
    tools = check_tools([F])
    assert check_choice(None, tools) == "auto" and check_choice("required", tools) == "required"
    assert check_choice({"type": "function", "function": {"name": "f"}}, tools) == "f"
    with pytest.raises(SchemaError) as e:
        check_choice({"type": "function", "function": {"name": "g"}}, tools)
    assert e.value.param == "tool_choice"
    assert grammar_for_calls(tools, "auto", True) is None and grammar_for_calls(tools, "none", True) is None
    assert "root" in grammar_for_calls(tools, "required", True) and "root" in grammar_for_calls(tools, "f", False)


def test_hostile_model_output_is_parsed_in_linear_time_and_never_raises():
    deep = "[" * 5000 + "]" * 5000
    assert parse_calls('{"name": "f", "arguments": ' + deep + "}", False, {"f"}) is None
    try:  # forced: the grammar's JSON; too deep is a ValueError the reply turns into plain text
        parse_calls('{"name": "f", "arguments": ' + deep + "}", True, {"f"})
    except ValueError:
        pass
    # backtracked quadratically through the old regex (minutes here: the suite's timeout ends it)
    assert parse_calls("<tool_call>" * 20000 + "{" * 20000, False, {"f"}) is None
