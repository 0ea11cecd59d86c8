"""The exact cache: reproducible requests answered from the ring owner, streamed or not, with
Cache-Control honoured and x-tidegate-cache saying what happened."""
import json
import time

from helpers.http import request
from helpers.llm import demo_llm, metric, post, sse
from helpers.wait import wait_for


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
    assert nc.headers["x-tidegate-cache"] == "refresh"  # asked anew, and stored again
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


def test_a_request_steers_the_caches_with_its_cache_object_and_headers(daemon_factory, demo_model):
    """Per request: a namespace (its entries meet only its own), force-refresh, exact-only or
    semantic-only, a shorter ttl; through the `cache` body object or headers; a control the
    caches cannot honour is a 400 naming it."""
    d = demo_llm(daemon_factory, demo_model, exact=True)
    body = {"model": "demo", "messages": [{"role": "user", "content": "Name three rivers"}], "max_tokens": 4,
            "temperature": 0}

    def ask(extra=None, headers=None):
        r = request(d.port, "POST", "/v1/chat/completions", json.dumps(dict(body, **(extra or {}))).encode(),
                    headers=headers or {}, timeout=30)
        assert r.status == 200, r.body
        return r.headers["x-tidegate-cache"]

    def stored(n):
        wait_for(lambda: metric(d, "tidegate_exact_inserts_total") >= n, 15, f"{n} exact-cache inserts")
    assert ask() == "miss"
    stored(1)
    assert ask() == "exact"
    assert ask({"cache": {"namespace": "eval-7"}}) == "miss"  # another namespace: the default's entry is not seen
    stored(2)
    assert ask({"cache": {"namespace": "eval-7"}}) == "exact"
    assert ask(headers={"X-Tidegate-Cache-Namespace": "eval-7"}) == "exact"  # the same namespace, by header
    assert ask({"cache": {"no_cache": True}}) == "refresh"
    assert ask(headers={"X-Tidegate-Cache-Refresh": "true"}) == "refresh"
    assert ask({"cache": {"mode": "semantic"}}) != "exact"  # semantic only: the exact entry is not looked up
    assert ask({"cache": {"namespace": "short", "ttl": 0.001}}) == "miss"
    stored(3)  # kept a millisecond: gone by the time it is asked again
    wait_for(lambda: ask({"cache": {"namespace": "short", "ttl": 0.001}}) == "miss", 15, "the short ttl to pass")
    for bad, param in (({"cache": {"tll": 5}}, "cache.tll"), ({"cache": {"ttl": -1}}, "cache.ttl"),
                       ({"cache": {"mode": "both-ish"}}, "cache.mode"), ({"cache": "no"}, "cache"),
                       ({"cache": {"namespace": "a b"}}, "cache.namespace")):
        r = request(d.port, "POST", "/v1/chat/completions", json.dumps(dict(body, **bad)).encode(), timeout=30)
        assert r.status == 400 and r.json()["error"]["param"] == param, r.body
    r = request(d.port, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                headers={"X-Tidegate-Cache-Mode": "sometimes"}, timeout=30)
    assert r.status == 400 and r.json()["error"]["param"] == "X-Tidegate-Cache-Mode"
    r = request(d.port, "POST", "/v1/embeddings", json.dumps({"model": "demo", "input": "x", "cache": {}}).encode(),
                timeout=30)
    assert r.status == 400 and r.json()["error"]["param"] == "cache"  # the embeddings route has no cache
