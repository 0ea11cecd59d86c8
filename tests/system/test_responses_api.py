"""POST /v1/responses, as applications use the official openai package's `client.responses`:
text and message input, instructions, max_output_tokens (status incomplete), streaming with its
typed events, function tools (forced calls validate; the call and its output go back as input
items), text.format json_schema, logprobs, and every stateful feature refused with a 400 naming it."""
import json

import jsonschema
import openai
import pytest

from helpers.llm import client, demo_llm, sse

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
          "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}}}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": SCHEMA}


@pytest.fixture
def llm(daemon_factory, demo_model):
    return demo_llm(daemon_factory, demo_model, exact=True)


def test_text_answers_match_chat_and_stream_the_same(llm):
    c = client(llm)
    r = c.responses.create(model="demo", input="Tell me a story about the sea", instructions="Be brief",
                           max_output_tokens=12, temperature=0, metadata={"run": "t1"})
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "demo"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 12 and r.usage.total_tokens == r.usage.input_tokens + 12
    assert r.instructions == "Be brief" and r.metadata == {"run": "t1"} and r.max_output_tokens == 12
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    chat = c.chat.completions.create(model="demo", max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief"}, {"role": "user", "content": "Tell me a story about the sea"}],
        extra_headers={"Cache-Control": "no-cache"})
    assert r.output_text == chat.choices[0].message.content != ""  # the same generation underneath
    # streamed: the typed events in order, the deltas adding up to the same text
    kinds, text, done = [], "", None
    with c.responses.stream(model="demo", input="Tell me a story about the sea", instructions="Be brief",
                            max_output_tokens=12, temperature=0,
                            extra_headers={"Cache-Control": "no-cache"}) as stream:
        for ev in stream:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                text += ev.delta
            assert ev.sequence_number == len(kinds) - 1
            if ev.type == "response.incomplete":  # (the SDK's get_final_response wants "completed")
                done = ev.response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert text == r.output_text == done.output_text and done.status == "incomplete"
    # message items as input, with text parts; a plain completed answer
    r2 = c.responses.create(model="demo", max_output_tokens=200, temperature=0, input=[
        {"role": "developer", "content": "Answer briefly"},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
        {"role": "user", "content": "How are you?"}])
    assert r2.status in ("completed", "incomplete") and r2.output_text


def test_an_exact_cache_hit_replays_in_the_responses_shape(llm):
    c = client(llm)
    ask = dict(model="demo", input="Name three fish", max_output_tokens=8, temperature=0)
    first = c.responses.with_raw_response.create(**ask)
    again = c.responses.with_raw_response.create(**ask)
    assert first.headers["x-tidegate-cache"] == "miss" and again.headers["x-tidegate-cache"] == "exact"
    assert again.parse().output_text == first.parse().output_text
    assert again.parse().usage.input_tokens_details.cached_tokens == again.parse().usage.input_tokens
    status, _, events, raw = sse(llm, "/v1/responses", dict(ask, stream=True))
    assert status == 200 and "event: response.completed" not in raw and "event: response.incomplete" in raw
    deltas = [json.loads(e) for e in events if '"response.output_text.delta"' in e]
    assert "".join(d["delta"] for d in deltas) == first.parse().output_text


def test_forced_function_calls_validate_and_round_trip(llm):
    c = client(llm)
    r = c.responses.create(model="demo", input="What is the weather in Paris?", tools=[WEATHER],
                           tool_choice="required", max_output_tokens=300, temperature=0.7)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and r.status == "completed" and r.output_text == ""
    for call in calls:
        assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
        jsonschema.validate(json.loads(call.arguments), SCHEMA)
    # streamed: function_call items with their arguments events
    args = {}
    with c.responses.stream(model="demo", input="Weather?", tools=[WEATHER], max_output_tokens=300, temperature=0,
                            tool_choice={"type": "function", "name": "get_weather"},
                            parallel_tool_calls=False) as stream:
        for ev in stream:
            if ev.type == "response.function_call_arguments.done":
                args[ev.item_id] = ev.arguments
        final = stream.get_final_response()
    assert len(args) == 1 and [o.arguments for o in final.output] == list(args.values())
    jsonschema.validate(json.loads(next(iter(args.values()))), SCHEMA)
    # the call and its output go back as input items; tool_choice none answers in text
    follow = c.responses.create(model="demo", max_output_tokens=8, temperature=0, tools=[WEATHER], tool_choice="none",
                                input=[{"role": "user", "content": "What is the weather in Paris?"},
                                       {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                                        "arguments": calls[0].arguments},
                                       {"type": "function_call_output", "call_id": calls[0].call_id,
                                        "output": "18 C, sunny"}])
    assert [o.type for o in follow.output] == ["message"] and follow.output_text


def test_json_schema_text_format_always_validates(llm):
    c = client(llm)
    person = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}}
    for i in range(2):
        r = c.responses.create(model="demo", input=f"Person {i}", max_output_tokens=200, temperature=0.8,
                               text={"format": {"type": "json_schema", "name": "person", "schema": person,
                                                "strict": True}})
        assert r.status == "completed", r.output_text
        jsonschema.validate(json.loads(r.output_text), person)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="demo", input="x", text={"format": {
            "type": "json_schema", "name": "p", "schema": {"type": "object", "properties": {
                "age": {"type": "integer", "minimum": 3}}}}})
    assert e.value.param == "text.format.schema.properties.age.minimum", e.value.body


def test_logprobs_come_in_output_text(llm):
    c = client(llm)
    r = c.responses.create(model="demo", input="Once", max_output_tokens=6, temperature=0, top_logprobs=2,
                           include=["message.output_text.logprobs"])
    lp = r.output[0].content[0].logprobs
    assert len(lp) == 6 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in lp)
    assert "".join(e.token for e in lp) == r.output_text or lp[0].token == lp[0].top_logprobs[0].token


@pytest.mark.parametrize("extra, param, code", [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "unsupported_parameter"),
    ({"store": True}, "store", "unsupported_parameter"),
    ({"background": True}, "background", "unsupported_parameter"),
    ({"reasoning": {"effort": "low"}}, "reasoning", "unsupported_parameter"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_parameter"),
    ({"max_output_tokens": 0}, "max_output_tokens", "invalid_parameter"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type", "unsupported_parameter"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate", "unknown_parameter"),
    ({"text": {"format": {"type": "xml"}}}, "text.format", "invalid_parameter"),
])
def test_what_is_not_kept_is_refused_naming_it(llm, extra, param, code):
    c = client(llm)
    kw = dict({"model": "demo", "input": "hi"}, **extra)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(**kw)
    assert e.value.code == code and e.value.param == param, e.value.body
