"""The OpenAI-compatible API end to end: the real daemon with its inference worker on the demo
model, spoken to over HTTP and with the official openai package."""
import json
import os
import signal
import socket
import time

import openai
import pytest

from helpers.http import request
from helpers.llm import client, metric, post, sse

@pytest.fixture
def llm(daemon_factory, demo_model):
    # caches off: these tests are about generation (tests/system/test_exact_cache.py and
    # tests/system/test_semantic_cache.py cover the caches)
    return daemon_factory(workers=2, cache={"exact_enabled": False, "semantic_enabled": False},
                          inference={"enabled": True, "models": [{"name": "demo", "path": demo_model,
                                                                  "n_ctx": 512, "max_seqs": 4}]})


def test_builtin_default_serves_the_demo_model_and_says_so(daemon_factory):
    d = daemon_factory(inference={"enabled": True})  # no model configured: the demo one
    models = request(d.port, path="/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tidegate-demo"]
    assert models[0]["owned_by"] == "tidegate-demo" and "demo model" in models[0]["description"]
    assert any(e.get("event") == "inference worker ready" and e.get("demo") for e in d.events())
    r = post(d, "/v1/completions", {"model": "tidegate-demo", "prompt": "Hello", "max_tokens": 3})
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_chat_and_completions_shapes_and_determinism(llm):
    body = {"model": "demo", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Name a colour."}],
            "max_tokens": 8, "temperature": 0}
    a, b = post(llm, "/v1/chat/completions", body).json(), post(llm, "/v1/chat/completions", body).json()
    assert a["object"] == "chat.completion" and a["model"] == "demo" and a["id"].startswith("chatcmpl-")
    choice = a["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert choice["message"]["content"] == b["choices"][0]["message"]["content"]  # greedy: reproducible
    u = a["usage"]
    assert u["completion_tokens"] == 8 and u["total_tokens"] == u["prompt_tokens"] + 8
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
    c = post(llm, "/v1/completions", {"model": "demo", "prompt": "The sky is", "max_tokens": 4, "temperature": 0})
    assert c.json()["object"] == "text_completion" and c.json()["choices"][0]["text"]
    # seeded sampling is reproducible too
    s1 = post(llm, "/v1/completions", {"model": "demo", "prompt": "Once", "max_tokens": 6, "temperature": 0.9,
                                       "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7}).json()
    s2 = post(llm, "/v1/completions", {"model": "demo", "prompt": "Once", "max_tokens": 6, "temperature": 0.9,
                                       "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7}).json()
    assert s1["choices"][0]["text"] == s2["choices"][0]["text"]


def test_stream_is_sse_with_done_and_matches_the_whole_answer(llm):
    body = {"model": "demo", "prompt": "In the beginning", "max_tokens": 12, "temperature": 0}
    whole = post(llm, "/v1/completions", body).json()["choices"][0]["text"]
    status, headers, events, raw = sse(llm, "/v1/completions", dict(body, stream=True,
                                                                     stream_options={"include_usage": True}))
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert events[-1] == "[DONE]" and raw.endswith("data: [DONE]\n\n")
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


def test_stop_strings_cut_the_answer(llm):
    body = {"model": "demo", "prompt": "Count with me", "max_tokens": 20, "temperature": 0}
    whole = post(llm, "/v1/completions", body).json()["choices"][0]["text"]
    stop = whole[5:8]
    cut = post(llm, "/v1/completions", dict(body, stop=[stop])).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == whole[:whole.find(stop)]
    _, _, events, _ = sse(llm, "/v1/completions", dict(body, stop=stop, stream=True))
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert streamed == cut["text"]


def test_errors_are_openai_shaped(llm):
    r = post(llm, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status == 404 and r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
    r = post(llm, "/v1/completions", {"model": "demo", "prompt": "x", "temperature": 9})
    assert r.status == 400 and r.json()["error"]["param"] == "temperature"
    r = post(llm, "/v1/chat/completions", {"model": "demo", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = post(llm, "/v1/completions", {"model": "demo", "prompt": "word " * 600, "max_tokens": 10})
    err = r.json()["error"]
    assert r.status == 400 and err["code"] == "context_length_exceeded" and "512" in err["message"]
    # a stream whose request is refused by the inference worker still gets the real status
    status, _, events, _ = sse(llm, "/v1/completions", {"model": "demo", "prompt": "word " * 600, "max_tokens": 10,
                                                        "stream": True})
    assert status == 400


def test_openai_package_works_for_everything(llm):
    c = client(llm)
    assert [m.id for m in c.models.list().data] == ["demo"]
    chat = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                     temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    stream = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == chat.choices[0].message.content and usage.completion_tokens == 5
    comp = c.completions.create(model="demo", prompt="Hello", max_tokens=4, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="demo", prompt="Hello", max_tokens=4,
                                                                        temperature=0, stream=True) if ch.choices)
    assert comp.choices[0].text == streamed
    emb = c.embeddings.create(model="demo", input=["a cat", "a dog"])  # the package asks for base64
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 128
    assert abs(sum(x * x for x in emb.data[0].embedding) - 1.0) < 1e-3
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="demo", prompt="word " * 600, max_tokens=10)
    assert e.value.code == "context_length_exceeded"


def test_client_disconnect_cancels_its_sequence(llm):
    s = socket.create_connection(("127.0.0.1", llm.port))
    body = json.dumps({"model": "demo", "prompt": "Go on forever", "max_tokens": 400, "stream": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    assert b"200 OK" in s.recv(4096)
    s.close()
    deadline = time.time() + 10
    while time.time() < deadline and metric(llm, "tidegate_llm_cancelled_total") < 1:
        time.sleep(0.2)
    assert metric(llm, "tidegate_llm_cancelled_total") >= 1
    assert metric(llm, "tidegate_llm_completion_tokens_total") < 400
    # a non-streamed request whose client leaves before the answer is cancelled too
    s = socket.create_connection(("127.0.0.1", llm.port))
    body = json.dumps({"model": "demo", "prompt": "Go on forever", "max_tokens": 400}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    time.sleep(0.05)
    s.close()
    deadline = time.time() + 10
    while time.time() < deadline and metric(llm, "tidegate_llm_cancelled_total") < 2:
        time.sleep(0.2)
    assert metric(llm, "tidegate_llm_cancelled_total") >= 2


def test_inference_worker_down_is_a_503_with_retry_after_then_recovers(llm):
    assert post(llm, "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 2}).status == 200
    pid = next(r["pid"] for r in llm.admin_json("workers")["body"] if r["id"].startswith("inference-"))
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.15)  # the ingress workers see the connection drop; the respawn takes longer
    r = post(llm, "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 2})
    assert r.status == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "worker_unavailable"
    deadline = time.time() + 20
    while time.time() < deadline:
        r = post(llm, "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 2})
        if r.status == 200:
            break
        time.sleep(0.2)
    assert r.status == 200


def test_llm_tokens_per_minute_are_reserved_up_front_and_settled(daemon_factory, demo_model):
    from tidegate.core.state.auth import hash_key
    key = "sk-tpm-test-0123456789"
    d = daemon_factory(auth={"keys": [{"key_sha256": hash_key(key), "tenant": "acme", "name": "k"}]},
                       ratelimit={"key_tpm": 100.0},
                       inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 512}]})
    auth = {"Authorization": f"Bearer {key}"}

    def ask(max_tokens):  # a new prompt each time: a cache hit would cost no tokens
        ask.n += 1
        return request(d.port, "POST", "/v1/completions", json.dumps(
            {"model": "demo", "prompt": f"Hi {ask.n}", "max_tokens": max_tokens, "temperature": 0}).encode(),
            headers=auth, timeout=30)
    ask.n = 0
    assert ask(150).status == 429  # prompt + 150 can never fit in 100 tokens/minute
    first = ask(60)
    assert first.status == 200  # reserved ~60, settled at the real usage (~62)
    r = ask(60)  # what is left (~38) cannot cover another 60
    assert r.status == 429 and r.headers["ratelimit-limit"] == "100"
    assert ask(20).status == 200


def test_make_demo_writes_a_llama_gguf_with_the_llama2_tokenizer(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "m.gguf"
    r = subprocess.run([sys.executable, "-m", "tidegate.workers.cli", "model", "make-demo", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and path.exists()
    from tidegate.core.llm.engine import Engine
    e = Engine(str(path), n_ctx=64, n_seq=1)
    assert e.tokenize("Hello world") == [1, 15043, 3186]  # Llama-2's ids: a real vocabulary
    assert e.meta("general.architecture") == "llama" and "<|assistant|>" in e.chat_template()


def test_reload_lets_a_running_stream_finish_and_serves_after(llm):
    import threading
    out = {}

    def long_stream():
        out["r"] = sse(llm, "/v1/completions", {"model": "demo", "prompt": "Tell a long story", "max_tokens": 480,
                                                "temperature": 0, "stream": True})
    t = threading.Thread(target=long_stream)
    t.start()
    time.sleep(0.1)
    assert llm.admin_json("reload")["ok"]
    t.join(60)
    status, _, events, raw = out["r"]
    assert status == 200 and events and events[-1] == "[DONE]", (status, raw[-500:])
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    r = post(llm, "/v1/completions", {"model": "demo", "prompt": "after", "max_tokens": 3})
    assert r.status == 200
    rows = llm.admin_json("workers")["body"]
    assert any(r["gen"] == 2 and r["state"] == "ready" for r in rows if r["id"].startswith("inference-"))


def test_inference_counters_reach_metrics(llm):
    body = {"model": "demo", "prompt": "Metrics please " * 20, "max_tokens": 4, "temperature": 0}
    post(llm, "/v1/completions", body)
    post(llm, "/v1/completions", dict(body, max_tokens=5))  # the same prompt again (not a cache hit): a prefix hit
    deadline = time.time() + 5
    while time.time() < deadline and metric(llm, "tidegate_llm_requests_total") < 2:
        time.sleep(0.1)
    assert metric(llm, "tidegate_llm_requests_total") >= 2
    assert metric(llm, "tidegate_llm_completion_tokens_total") >= 9
    assert metric(llm, "tidegate_prefix_hits_live_total") >= 1 and metric(llm, "tidegate_llm_cached_tokens_total") >= 16
    text = request(llm.port, path="/metrics").body.decode()
    assert "tidegate_llm_active_sequences" in text and "tidegate_prefix_ram_bytes" in text
