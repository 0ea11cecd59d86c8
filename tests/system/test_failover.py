"""Failover in front of failing providers (issue 27): one real daemon, one fake provider
(tests/helpers/fault_provider.py) whose model name picks the fault, one gateway model per case.
Each test asks through the openai SDK (its own retries off), streamed and not, and asserts what
the client got, how many attempts the provider saw, and how far apart they were.

Deadlines are short here (1 s) so a silent backend costs a second; the defaults are 10-15 s."""
import json

import openai
import pytest

from helpers.daemon import Daemon
from helpers.fault_provider import FaultProvider
from helpers.wait import wait_for

WHOLE = " ".join(f"w{i}" for i in range(60))  # the provider's whole answer
MSG = [{"role": "user", "content": "Tell me the words"}]


def model(p, name, *faults, **kw):
    """A gateway model over the provider's faults, tried in the order listed (least_loaded keeps
    the list's order between idle backends)."""
    backends = [{"url": p.url, "model": f} if isinstance(f, str) else {"url": p.url, **f} for f in faults]
    return {"name": name, "backends": backends, "routing": "least_loaded", "health_interval": 600,
            "header_timeout": 1, "first_token_timeout": 1, "stall_timeout": 1, **kw}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    p = FaultProvider()
    models = [
        model(p, "r429-after", "429-retry-after:1", retry={"attempts": 2}),
        model(p, "r429-after-ok", "429-retry-after:1", "ok"),
        model(p, "r429", "429", "ok"),
        model(p, "m500", "500-once"),
        model(p, "r503", "503", "ok"),
        model(p, "reset", "reset", "ok"),
        model(p, "silent", "silent", "ok"),
        model(p, "slow", "slow-first:20", "ok"),
        model(p, "cut", "cut:40", {"model": "ok", "prefill": True}),
        model(p, "cut-noprefill", "cut:40", "no-prefill"),
        model(p, "stall", "stall:20", "ok"),
        model(p, "malformed", "malformed"),
        model(p, "nodone", "no-done"),
        model(p, "small", "context", fallbacks=["big"]),
        model(p, "big", "ok"),
        model(p, "filter", "filter", "ok"),
        model(p, "flappy", "down", "ok", retry={"attempts": 2}),
    ]
    tmp = tmp_path_factory.mktemp("failover")
    d = Daemon(tmp, workers=1, cache={"exact_enabled": False, "semantic_enabled": False},
               breakers={"open_for": 0.5}, inference={"enabled": True, "models": models})
    d.start()
    d.provider = p
    yield d
    d.stop()
    p.close()


def refused(gw, model, stream, error):
    """Ask `model` (its fault), expecting `error`: (the error, the attempts the fault's backend
    saw, those the healthy backend saw)."""
    p = gw.provider
    before, ok = p.count(model), p.count("ok")
    with pytest.raises(error) as e:
        ask(gw, model, stream)
    return e.value, p.count(model) - before, p.count("ok") - ok


def backends(d, name) -> dict:
    """tidegate admin backends: model name's backends by their model (one ingress worker)."""
    body = d.admin_json("backends")["body"]
    return {b["model"]: b for w in body.values() for b in w.get(name, {}).get("backends", ())}


def client(d, **kw):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key="unused", max_retries=0, timeout=30,
                         **kw)


def ask(d, name, stream, **kw):
    """(text, raw response or None) of a chat completion: the streamed text joined."""
    c = client(d)
    if stream:
        text = ""
        for chunk in c.chat.completions.create(model=name, messages=MSG, stream=True, **kw):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        return text, None
    raw = c.chat.completions.with_raw_response.create(model=name, messages=MSG, **kw)
    return raw.parse().choices[0].message.content, raw


@pytest.mark.parametrize("stream", [False, True])
def test_429_with_retry_after_is_waited_for_then_passed_on_with_it(gw, stream):
    p, before = gw.provider, gw.provider.count("429-retry-after:1")
    with pytest.raises(openai.RateLimitError) as e:
        ask(gw, "r429-after", stream)
    times = p.times("429-retry-after:1")[before:]
    assert len(times) == 2 and times[1] - times[0] >= 0.95  # retried once, after the provider's Retry-After
    assert e.value.response.headers["retry-after"] == "1"  # and the client is told when, too
    assert e.value.body["code"] == "backend_rate_limited"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name, fault", [("r429-after-ok", "429-retry-after:1"), ("r429", "429"), ("r503", "503")])
def test_a_refusing_backend_fails_over_to_the_next_at_once(gw, stream, name, fault):
    p = gw.provider
    before, ok = p.count(fault), p.count("ok")
    text, raw = ask(gw, name, stream)
    assert text == WHOLE  # (the next backend at once: the policy's NEXT carries no wait, tests/unit/llm)
    assert p.count(fault) - before == 1 and p.count("ok") - ok == 1
    if raw is not None:  # the answer names the backend that gave it, and its model
        assert raw.headers["x-tidegate-backend"] == p.url and raw.parse().model == "ok"


@pytest.mark.parametrize("stream", [False, True])
def test_a_500_once_is_retried_on_the_same_backend_after_a_backoff(gw, stream):
    p, before = gw.provider, gw.provider.count("500-once")
    text, raw = ask(gw, "m500", stream, max_tokens=60, temperature=0.5 if stream else 0.4)  # (a new prompt key)
    assert text == WHOLE and p.count("500-once") - before == 2
    if raw is not None:
        assert raw.parse().usage.completion_tokens == 60  # the failed attempt is not billed


@pytest.mark.parametrize("stream", [False, True])
def test_a_reset_after_the_request_went_out_is_not_repeated_unless_the_client_allows_it(gw, stream):
    p = gw.provider
    err, attempts, healthy = refused(gw, "reset", stream, openai.APIStatusError)
    assert err.status_code == 502 and attempts == 1 and healthy == 0  # lost: not rerun
    ok = p.count("ok")
    text, _ = ask(gw, "reset", stream, extra_headers={"Idempotency-Key": f"k-{stream}"})
    assert text == WHOLE and p.count("ok") - ok == 1  # the client said it may run twice


@pytest.mark.parametrize("stream", [False, True])
def test_a_silent_backend_costs_its_header_deadline_not_a_minute(gw, stream):
    p, before = gw.provider, gw.provider.count("silent")
    with pytest.raises(openai.APIStatusError) as e:
        ask(gw, "silent", stream)
    # the header deadline's answer (1 s here), not the generation watchdog's (idle_timeout, 60 s)
    assert e.value.status_code == 504 and e.value.body["code"] == "backend_timeout"
    assert "within 1 s" in e.value.body["message"] and p.count("silent") - before == 1
    text, _ = ask(gw, "silent", stream, extra_headers={"Idempotency-Key": f"s-{stream}"})
    assert text == WHOLE


@pytest.mark.parametrize("stream", [False, True])
def test_a_slow_first_token_fails_over_before_the_client_sees_anything(gw, stream):
    p = gw.provider
    before, ok = p.count("slow-first:20"), p.count("ok")
    text, _ = ask(gw, "slow", stream)
    # whole, from the healthy backend: the slow one was left after first_token_timeout (its first
    # token would have come only after 20 s, and then the answer would be its)
    assert text == WHOLE and p.count("slow-first:20") - before == 1 and p.count("ok") - ok == 1


@pytest.mark.parametrize("name, fault", [("cut", "cut:40"), ("stall", "stall:20")])
def test_a_stream_cut_or_stalled_mid_answer_is_continued_on_the_next_backend(gw, name, fault):
    p, before = gw.provider, len(gw.provider.bodies("ok"))
    text, _ = ask(gw, name, True)
    assert text == WHOLE  # complete: the continuation started where the cut left off, nothing twice
    sent = int(fault.split(":")[1])
    cont = p.bodies("ok")[before]  # the continuation: the answer so far as the assistant's message
    assert cont["messages"][-1] == {"role": "assistant", "content": " ".join(f"w{i}" for i in range(sent))}
    assert p.count("ok") - before == 1  # (one continuation, no restart)
    assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False


def test_a_whole_answer_cut_mid_way_is_asked_again_from_the_start(gw):
    text, raw = ask(gw, "cut", False)
    assert text == WHOLE and raw.parse().usage.completion_tokens == 60


def test_a_cut_stream_whose_fallback_refuses_a_prefill_ends_with_an_error_never_a_clean_end(gw):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": "cut-noprefill", "messages": MSG,
                                                             "stream": True}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    raw = r.read().decode()
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert r.status == 200 and "[DONE]" not in events
    parsed = [json.loads(e) for e in events]
    assert not any(c.get("finish_reason") for e in parsed for c in e.get("choices", ()))
    assert parsed[-1]["error"]["code"] == "backend_stream_cut"
    words = "".join(c["delta"].get("content") or "" for e in parsed for c in e.get("choices", ()))
    assert words == " ".join(f"w{i}" for i in range(40))  # what the client has is what was sent, once


@pytest.mark.parametrize("stream", [False, True])
def test_a_malformed_chunk_is_skipped_and_counted(gw, stream):
    text, _ = ask(gw, "malformed", stream)
    assert text == WHOLE
    wait_for(lambda: backends(gw, "malformed")["malformed"]["malformed_chunks"] >= 1, 30,
             "the skipped chunk to show in tidegate admin backends")


@pytest.mark.parametrize("stream", [False, True])
def test_a_stream_without_done_but_with_its_finish_is_whole(gw, stream):
    text, raw = ask(gw, "nodone", stream)
    assert text == WHOLE
    if raw is not None:
        assert raw.parse().choices[0].finish_reason == "stop" and raw.parse().usage.completion_tokens == 60


@pytest.mark.parametrize("stream", [False, True])
def test_a_context_length_refusal_moves_to_the_larger_model_of_the_chain(gw, stream):
    p, before = gw.provider, gw.provider.count("context")
    text, raw = ask(gw, "small", stream)
    assert text == WHOLE and p.count("context") - before == 1
    if raw is not None:  # the fallback model is named, and the model of its backend that answered
        assert raw.headers["x-tidegate-fallback"] == "big" and raw.parse().model == "ok"


@pytest.mark.parametrize("stream", [False, True])
def test_a_content_filter_refusal_is_passed_on_and_never_retried(gw, stream):
    err, attempts, healthy = refused(gw, "filter", stream, openai.BadRequestError)
    assert err.body["code"] == "content_filter" and attempts == 1 and healthy == 0


def test_a_primary_down_for_a_while_is_routed_around_and_taken_back_when_it_recovers(gw):
    p = gw.provider
    p.down_until = float("inf")  # down until the test says
    served = []
    for i in range(10):
        text, raw = ask(gw, "flappy", False, temperature=0.1 + i / 100)
        assert text == WHOLE  # every one answered: by the second backend while the first is down
        served.append(raw.parse().model)
    assert set(served) == {"ok"}
    p.down_until = 0.0  # it recovers: once its breaker lets a trial through, it answers again
    back = []

    def primary_answers() -> bool:
        text, raw = ask(gw, "flappy", False, temperature=0.5 + len(back) / 1000)
        back.append(raw.parse().model)
        return text == WHOLE and back[-1] == "down"
    wait_for(primary_answers, 60, "the recovered primary to be asked again", every=0.05)
    wait_for(lambda: backends(gw, "flappy")["down"]["failovers"] >= 1 and backends(gw, "flappy")["ok"]["served"] >= 10,
             30, "the failovers to show in tidegate admin backends")
