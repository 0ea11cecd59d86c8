"""The exact cache: reproducible requests answered from the ring owner, streamed or not, with
Cache-Control honoured and x-tidegate-cache saying what happened."""
import json
import time

from helpers.http import request
from helpers.llm import metric, post, sse


def landed(d, inserts: int) -> None:
    """Wait until the owner has stored `inserts` entries in all: the put travels to the key's
    owner after the answer was written, so a request right behind it on the other worker may
    reach the owner first (a miss there, then a semantic hit)."""
    deadline = time.time() + 5
    while metric(d, "tidegate_exact_inserts_total") < inserts:
        assert time.time() < deadline, "the exact-cache entry never reached its owner"
        time.sleep(0.05)


def test_exact_hits_skip_the_model_and_replay_streams(daemon_factory, demo_model):
    d = daemon_factory(workers=2, inference={"enabled": True, "models": [{"name": "demo", "path": demo_model,
                                                                            "n_ctx": 512}]})
    body = {"model": "demo", "messages": [{"role": "user", "content": "Cache me"}], "max_tokens": 6,
            "temperature": 0}
    first = post(d, "/v1/chat/completions", body)
    assert first.headers["x-tidegate-cache"] == "miss"
    landed(d, 1)
    hits = [post(d, "/v1/chat/completions", body) for _ in range(4)]  # both workers: one owner
    assert all(h.headers["x-tidegate-cache"] == "exact" for h in hits)
    assert {h.json()["choices"][0]["message"]["content"] for h in hits} == {
        first.json()["choices"][0]["message"]["content"]}
    deadline = time.time() + 5
    while time.time() < deadline and metric(d, "tidegate_llm_requests_total") < 1:
        time.sleep(0.1)
    assert metric(d, "tidegate_llm_requests_total") == 1  # the model ran once
    status, headers, events, _ = sse(d, "/v1/chat/completions", dict(body, stream=True))
    assert status == 200 and headers["x-tidegate-cache"] == "exact" and events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == first.json()["choices"][0]["message"]["content"]
    # Cache-Control: no-cache skips the lookup, no-store the insert
    nc = request(d.port, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                 headers={"Cache-Control": "no-cache"}, timeout=30)
    assert nc.headers["x-tidegate-cache"] == "miss"
    other = dict(body, max_tokens=5)
    request(d.port, "POST", "/v1/chat/completions", json.dumps(other).encode(), headers={"Cache-Control": "no-store"},
            timeout=30)
    assert post(d, "/v1/chat/completions", other).headers["x-tidegate-cache"] == "miss"
    # sampled answers are not cached unless asked to
    sampled = dict(body, temperature=0.8)
    post(d, "/v1/chat/completions", sampled)
    assert post(d, "/v1/chat/completions", sampled).headers["x-tidegate-cache"] == "miss"
    seeded = dict(sampled, seed=3)
    time.sleep(0.6)  # (heartbeats every 0.2 s: the count now includes every earlier insert)
    inserts = metric(d, "tidegate_exact_inserts_total")
    post(d, "/v1/chat/completions", seeded)
    landed(d, inserts + 1)
    assert post(d, "/v1/chat/completions", seeded).headers["x-tidegate-cache"] == "exact"


def test_a_streamed_answer_is_cached_whole(daemon_factory, demo_model):
    d = daemon_factory(inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 512}]})
    body = {"model": "demo", "prompt": "Stream then cache", "max_tokens": 8, "temperature": 0}
    _, headers, events, _ = sse(d, "/v1/completions", dict(body, stream=True))
    assert headers["x-tidegate-cache"] == "miss"
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    hit = post(d, "/v1/completions", body)
    assert hit.headers["x-tidegate-cache"] == "exact" and hit.json()["choices"][0]["text"] == streamed
    assert hit.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == hit.json()["usage"]["prompt_tokens"]
