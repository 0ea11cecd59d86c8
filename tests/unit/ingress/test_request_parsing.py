"""routes/request.py: one frozen request object per generation route, 400s naming the parameter
as the client sent it (chat and Responses alike), and the keys computed once."""
import dataclasses

import pytest

from tidegate.core.base import config
from tidegate.core.http.http11 import HttpError
from tidegate.core.overload.classes import Classes
from tidegate.core.state.auth import ANONYMOUS, Identity
from tidegate.workers.ingress.routes.request import (CHAT_FIELDS, GenRequest, Spec, parse_chat, parse_completion,
                                                      parse_embeddings)
from tidegate.workers.ingress.routes.responses import NAMES, ResponsesRoute

CFG = config.load(None, {})
MODELS = {"demo": {"name": "demo", "n_ctx": 512, "class": None}, "bg": {"name": "bg", "n_ctx": 512,
                                                                      "class": "background"}}


def spec(**kw):
    return Spec(MODELS, CFG["inference"], Classes(CFG), **kw)


def chat(body, who=ANONYMOUS, **kw):
    return parse_chat(body, who, "/v1/chat/completions", spec(**kw))


def refusal(fn, *args) -> HttpError:
    with pytest.raises(HttpError) as e:
        fn(*args)
    return e.value


MSG = [{"role": "user", "content": "hi"}]


def test_a_chat_request_is_one_frozen_object():
    g = chat({"model": "demo", "messages": MSG, "temperature": 0, "max_tokens": 5, "stream": True,
              "stream_options": {"include_usage": True}}, exact=True, semantic=True)
    assert isinstance(g, GenRequest) and g.chat and g.stream and g.include_usage and g.n == 1
    assert g.params["temperature"] == 0.0 and g.params["max_tokens"] == 5 and g.downstream == "inference:demo"
    assert g.reusable and g.exact_key and g.semantic_key == (g.semantic_key[0], "hi")
    assert g.cls == CFG["classes"]["default"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.model = "other"


def test_keys_follow_what_may_be_cached():
    sampled = chat({"model": "demo", "messages": MSG}, exact=True, semantic=True)
    assert not sampled.reusable and sampled.exact_key is None  # (cache.exact_any is off)
    assert chat({"model": "demo", "messages": MSG, "seed": 1}, exact=True).exact_key is not None
    assert chat({"model": "demo", "messages": MSG, "seed": 1, "n": 2}, exact=True, semantic=True).exact_key is None
    a = chat({"model": "demo", "messages": MSG, "seed": 1}, exact=True)
    b = chat({"model": "demo", "messages": MSG, "seed": 1}, Identity("k", "u", "globex", "", "u"), exact=True)
    assert a.exact_key != b.exact_key  # tenants never share an entry


def test_the_class_comes_from_the_model_then_the_route_then_the_caller():
    assert chat({"model": "bg", "messages": MSG}).cls == "background"
    assert chat({"model": "demo", "messages": MSG}, Identity("k", "u", "t", "critical", "u")).cls == "critical"


def test_completions_and_embeddings():
    g = parse_completion({"model": "demo", "prompt": ["once"], "logprobs": 2}, ANONYMOUS, "/v1/completions", spec())
    assert not g.chat and g.what == {"prompt": "once"} and g.params["logprobs"] == 2
    e = parse_embeddings({"model": "demo", "input": "x", "encoding_format": "base64"}, ANONYMOUS, "/v1/embeddings",
                         spec())
    assert e.input == ["x"] and e.base64 and e.downstream == "inference:demo"


@pytest.mark.parametrize("body, param, code", [
    ({"messages": MSG}, "model", "missing_model"),
    ({"model": "demo", "messages": MSG, "functions": []}, "functions", "unsupported_parameter"),
    ({"model": "demo", "messages": MSG, "frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ({"model": "demo", "messages": []}, "messages", "invalid_parameter"),
    ({"model": "demo", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_parameter"),
    ({"model": "demo", "messages": MSG, "temperature": 3}, "temperature", "invalid_parameter"),
    ({"model": "demo", "messages": MSG, "max_tokens": 0}, "max_tokens", "invalid_parameter"),
    ({"model": "demo", "messages": MSG, "top_logprobs": 2}, "top_logprobs", "invalid_parameter"),
    ({"model": "demo", "messages": MSG, "response_format": {"type": "yaml"}}, "response_format", "invalid_parameter"),
    ({"model": "demo", "messages": MSG, "n": 2, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "n", "unsupported_parameter"),
])
def test_a_bad_chat_parameter_is_a_400_naming_it(body, param, code):
    e = refusal(chat, body)
    assert (e.status, e.param, e.code) == (400, param, code)


def test_an_unknown_model_is_a_404():
    e = refusal(chat, {"model": "nope", "messages": MSG})
    assert (e.status, e.param, e.code) == (404, "model", "model_not_found")


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object",
                                                                                     "not": {}}}}},
     "text.format.schema.not"),
    ({"input": "hi", "tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
    ({"input": "hi", "top_logprobs": 30}, "top_logprobs"),
])
def test_responses_400s_name_what_its_client_sent(body, param):
    route = ResponsesRoute(None)
    translated, _ = route._as_chat(dict(body, model="demo"))
    e = refusal(parse_chat, translated, ANONYMOUS, "/v1/responses", spec(), NAMES, False)
    assert e.status == 400 and e.param == param, (e.param, e.message)
    assert param in e.message


def test_every_chat_field_is_known():
    assert {"messages", "tools", "response_format", "logprobs"} <= CHAT_FIELDS
