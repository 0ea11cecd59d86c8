"""OpenAI parity, as applications use the official openai package: /v1/models/{id}, penalties,
structured outputs (json_object, json_schema through a grammar: always parses and validates, even
from the random-weight demo model), and every parameter the server does not honour refused with
a 400 naming it (never dropped)."""
import openai
import pytest

from helpers.llm import client, post

MSG = [{"role": "user", "content": "Tell me a story about the sea"}]


@pytest.fixture
def llm(daemon_factory, demo_model):
    return daemon_factory(cache={"exact_enabled": False, "semantic_enabled": False},
                          inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 512}]})


def test_models_retrieve(llm):
    c = client(llm)
    m = c.models.retrieve("demo")
    assert m.id == "demo" and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("nope")
    assert e.value.code == "model_not_found"


@pytest.mark.parametrize("extra, param, code", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
      "tool_choice": "required"}, ("tools", "tool_choice"), "unsupported_parameter"),
    ({"response_format": {"type": "xml"}}, "response_format", "invalid_parameter"),
    ({"logprobs": True, "top_logprobs": 2}, "logprobs", "unsupported_parameter"),
    ({"n": 2}, "n", "unsupported_parameter"),
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
