"""OpenAI parity, as applications use the official openai package: /v1/models/{id}, penalties,
structured outputs (json_object, json_schema through a grammar: always parses and validates, even
from the random-weight demo model), logprobs, and every parameter the server does not honour refused with
a 400 naming it (never dropped)."""
import openai
import pytest

from helpers.llm import client, demo_llm, post

MSG = [{"role": "user", "content": "Tell me a story about the sea"}]


@pytest.fixture
def llm(daemon_factory, demo_model):
    return demo_llm(daemon_factory, demo_model, exact=False)


def test_models_retrieve(llm):
    c = client(llm)
    m = c.models.retrieve("demo")
    assert m.id == "demo" and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("nope")
    assert e.value.code == "model_not_found"


@pytest.mark.parametrize("extra, param, code", [
    ({"extra_body": {"functions": [{"name": "f"}]}}, "functions", "unsupported_parameter"),
    ({"response_format": {"type": "xml"}}, "response_format", "invalid_parameter"),
    ({"top_logprobs": 2}, "top_logprobs", "invalid_parameter"),
    ({"n": 9}, "n", "invalid_parameter"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate", "unknown_parameter"),
])
def test_what_is_not_honoured_is_refused_naming_it(llm, extra, param, code):
    c = client(llm)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="demo", messages=MSG, max_tokens=4, **extra)
    assert e.value.code == code and e.value.param in ((param,) if isinstance(param, str) else param), e.value.body


def test_completions_and_embeddings_refuse_what_they_do_not_honour(llm):
    r = post(llm, "/v1/completions", {"model": "demo", "prompt": "x", "echo": True})
    assert r.status == 400 and r.json()["error"]["param"] == "echo"
    r = post(llm, "/v1/completions", {"model": "demo", "prompt": "x", "suffix": "y"})
    assert r.status == 400 and r.json()["error"]["param"] == "suffix"
    r = post(llm, "/v1/embeddings", {"model": "demo", "input": "x", "dimensions": 8})
    assert r.status == 400 and r.json()["error"]["param"] == "dimensions"


def test_penalties_change_greedy_text_and_are_bounded(llm):
    c = client(llm)

    def text(**kw):
        r = c.chat.completions.create(model="demo", messages=MSG, max_tokens=48, temperature=0, **kw)
        return r.choices[0].message.content
    plain = text()
    assert text() == plain  # greedy is deterministic
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repeat_penalty": 1.5}}):
        assert text(**kw) != plain, kw  # the penalties sampler really runs
    with pytest.raises(openai.BadRequestError) as e:
        text(frequency_penalty=3.0)
    assert e.value.param == "frequency_penalty"


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}


def test_json_schema_output_always_parses_and_validates(llm):
    import json

    import jsonschema
    c = client(llm)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for i in range(3):  # the random-weight model, constrained: a well-formed object every time
        r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": f"Person {i}"}],
                                      max_tokens=200, temperature=0.8, seed=i, response_format=fmt)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="demo", messages=MSG, max_tokens=200, temperature=0, response_format=fmt, stream=True) if ch.choices]
    jsonschema.validate(json.loads("".join(parts)), PERSON)
    r = c.chat.completions.create(model="demo", messages=MSG, max_tokens=300, temperature=0,
                                  response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":  # else cut by max_tokens, as OpenAI's can be
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="demo", messages=MSG, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "n", "schema": {
                "type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}}})
    assert e.value.param == "response_format.json_schema.schema.properties.age.minimum"


def test_logprobs_for_chat_and_completions_streamed_and_not(llm):
    c = client(llm)
    r = c.chat.completions.create(model="demo", messages=MSG, max_tokens=12, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    for e in content:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.token == e.top_logprobs[0].token and abs(e.logprob - e.top_logprobs[0].logprob) < 1e-5
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == r.choices[0].message.content
    entries, text = [], ""
    for ch in c.chat.completions.create(model="demo", messages=MSG, max_tokens=12, temperature=0, logprobs=True,
                                        stream=True):
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            if ch.choices[0].logprobs is not None:
                entries += ch.choices[0].logprobs.content
    assert text == r.choices[0].message.content and [e.token for e in entries] == [e.token for e in content]
    assert all(e.top_logprobs == [] for e in entries)  # top_logprobs not asked for
    comp = c.completions.create(model="demo", prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert all(len(t) <= 2 and v <= 0 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    plain = c.chat.completions.create(model="demo", messages=MSG, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"type": "string", "maxLength": 8}}}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}


def _valid_calls(calls, names):
    import json

    import jsonschema
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_forced_tool_calls_are_well_formed_and_validate(llm):
    c = client(llm)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat.completions.create(model="demo", messages=ask, max_tokens=300, temperature=0, tools=[WEATHER, TIME],
                                  tool_choice="required")
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None, r.choices[0].message.content
    _valid_calls(r.choices[0].message.tool_calls, {"get_weather", "get_time"})
    r = c.chat.completions.create(model="demo", messages=ask, max_tokens=300, temperature=0.7, seed=3,
                                  tools=[WEATHER, TIME], parallel_tool_calls=False,
                                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    _valid_calls(calls, {"get_time"})
    streamed = {}
    for ch in c.chat.completions.create(model="demo", messages=ask, max_tokens=300, temperature=0,
                                        tools=[WEATHER], tool_choice="required", stream=True):
        if ch.choices and ch.choices[0].delta.tool_calls:
            for d in ch.choices[0].delta.tool_calls:
                streamed.setdefault(d.index, d)
        if ch.choices and ch.choices[0].finish_reason:
            assert ch.choices[0].finish_reason == "tool_calls"
    _valid_calls(list(streamed.values()), {"get_weather"})
    # the call and its result go back into the conversation; "none" answers in text
    first = r.choices[0].message
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": first.tool_calls[0].id, "type": "function",
         "function": {"name": "get_time", "arguments": first.tool_calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "12:00"}]
    r = c.chat.completions.create(model="demo", messages=history, max_tokens=8, temperature=0, tools=[WEATHER, TIME],
                                  tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    r = c.chat.completions.create(model="demo", messages=history, max_tokens=8, temperature=0, tools=[WEATHER])
    if r.choices[0].finish_reason == "tool_calls":  # auto: the model decides; a call it makes is well formed
        _valid_calls(r.choices[0].message.tool_calls, {"get_weather"})
    else:
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content is not None


def test_bad_tools_are_refused_naming_the_parameter(llm):
    c = client(llm)
    for kw, param in (({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                       "tool_choice"),
                      ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                          "type": "object", "properties": {"x": {"type": "integer", "minimum": 1}}}}}]},
                       "tools[0].function.parameters.properties.x.minimum"),
                      ({"tool_choice": "required"}, "tool_choice"),
                      ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="demo", messages=MSG, max_tokens=4, **kw)
        assert e.value.param == param, (kw, e.value.body)


def test_n_choices_share_one_prefill(llm):
    c = client(llm)
    one = c.chat.completions.create(model="demo", messages=MSG, max_tokens=16, temperature=0)
    two = c.chat.completions.create(model="demo", messages=MSG, max_tokens=16, temperature=0, n=2)
    # greedy: each choice, started from the one prefill's logits and a copy of its KV, is the n=1 text
    assert [ch.index for ch in two.choices] == [0, 1]
    assert all(ch.message.content == one.choices[0].message.content for ch in two.choices)
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.usage.completion_tokens == sum(len(ch.message.content) > 0 and 16 for ch in two.choices)
    many = c.chat.completions.create(model="demo", messages=MSG, max_tokens=16, temperature=1.0, seed=7, n=3)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in many.choices}) > 1  # each choice samples with its own seed
    texts: dict = {}
    finished = set()
    for ch in c.chat.completions.create(model="demo", messages=MSG, max_tokens=16, temperature=0, n=2, stream=True):
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and texts == {0: one.choices[0].message.content, 1: one.choices[0].message.content}
    comp = c.completions.create(model="demo", prompt="Once upon a time", max_tokens=8, temperature=0, n=2, logprobs=1)
    assert len(comp.choices) == 2 and comp.choices[0].text == comp.choices[1].text
    assert comp.choices[0].logprobs.text_offset == comp.choices[1].logprobs.text_offset  # each choice from 0
