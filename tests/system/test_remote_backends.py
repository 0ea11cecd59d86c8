"""A model served by remote OpenAI-compatible servers: real ones on loopback (a second tidegate
with the demo model, llama-cpp-python's server), prefix-affinity routing, retries on connect
errors only, and a stream cut mid-answer reaching the client as an error, never a clean end."""
import http.client
import json
import time

import openai
import pytest

from helpers.daemon import free_port
from helpers.llama_cpp_server import LlamaCppServer
from helpers.llm import client, metric

NO_CACHE = {"exact_enabled": False, "semantic_enabled": False}


def backend_daemon(daemon_factory, demo_model):
    return daemon_factory(cache=NO_CACHE, inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 2048}]})


def gateway(daemon_factory, backends, **model):
    return daemon_factory(cache=NO_CACHE, inference={"enabled": True, "models": [{"name": "remote", "backends": backends, **model}]})


def test_a_remote_model_through_real_backends_with_the_openai_sdk(daemon_factory, demo_model):
    a = backend_daemon(daemon_factory, demo_model)
    b = LlamaCppServer(demo_model)
    try:
        g = gateway(daemon_factory, [{"url": f"http://127.0.0.1:{a.port}", "model": "demo"}, {"url": b.url}],
                    routing="round_robin")
        c = client(g)
        for _ in range(2):  # one through each backend
            r = c.chat.completions.create(model="remote", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8, temperature=0)
            assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
            assert r.usage.completion_tokens > 0
            chunks = list(c.chat.completions.create(model="remote", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=8, stream=True, stream_options={"include_usage": True}))
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
            assert chunks[-1].usage.completion_tokens > 0
            # a prompt counts against tokens/minute from either backend (llama-cpp-python's server sends
            # no usage when streaming: estimated, never 0)
            assert chunks[-1].usage.prompt_tokens > 0
        comp = c.completions.create(model="remote", prompt="Once upon a time", max_tokens=8)
        assert comp.choices[0].text
        assert metric(g, "tidegate_remote_requests_total") >= 5
        # what a remote backend is not sent is refused, naming the parameter
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="remote", messages=[{"role": "user", "content": "x"}], logprobs=True)
        assert e.value.body["param"] == "logprobs"
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="remote", messages=[{"role": "user", "content": "x"}],
                                      response_format={"type": "json_object"})
        assert e.value.body["param"] == "response_format"
    finally:
        b.kill()


def _share(g) -> float:
    return metric(g, "tidegate_remote_prefix_blocks_hit_total") / max(1.0, metric(g, "tidegate_remote_prefix_blocks_total"))


def test_prefix_affinity_sends_a_prompt_back_to_the_backend_that_holds_it(daemon_factory, demo_model):
    a, b = backend_daemon(daemon_factory, demo_model), backend_daemon(daemon_factory, demo_model)
    backends = [{"url": f"http://127.0.0.1:{d.port}", "model": "demo"} for d in (a, b)]
    shares = {}
    for routing in ("prefix", "round_robin"):
        g = gateway(daemon_factory, backends, routing=routing)
        c = client(g)
        for turn in range(3):
            for t in range(5):  # five long system prompts, each asked three times (odd: round robin moves them)
                system = f"You are assistant number {t} of tenant {t}. " + "Policy text. " * 60
                c.chat.completions.create(model="remote", max_tokens=2, messages=[
                    {"role": "system", "content": system}, {"role": "user", "content": f"question {turn}"}])
        shares[routing] = _share(g)
    # prefix: the 2nd and 3rd ask of each prompt find their system prompt's blocks where they went
    assert shares["prefix"] > 0.6 and shares["prefix"] > shares["round_robin"] + 0.2, shares
    for d in (a, b):  # and both backends were used
        assert metric(d, "tidegate_llm_completion_tokens_total") > 0


def test_connect_errors_go_to_the_next_backend(daemon_factory, demo_model):
    a, gone = backend_daemon(daemon_factory, demo_model), backend_daemon(daemon_factory, demo_model)
    g = gateway(daemon_factory, [{"url": f"http://127.0.0.1:{d.port}", "model": "demo"} for d in (gone, a)],
                routing="round_robin", health_interval=600)  # (no health check marks it down in the test's time)
    c = client(g)
    for i in range(2):  # one through each (and the first health check saw both up)
        c.chat.completions.create(model="remote", messages=[{"role": "user", "content": f"warm {i}"}], max_tokens=2)
    time.sleep(0.5)
    gone.stop()  # nothing listens there now: a connect error, nothing was sent
    for i in range(6):
        r = c.chat.completions.create(model="remote", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4)
        assert r.choices[0].message.content
    assert metric(g, "tidegate_remote_connect_errors_total") >= 1
    assert metric(g, "tidegate_remote_requests_total") == 8  # each request sent once, to a live backend


def test_a_stream_cut_mid_answer_is_an_error_event_never_a_clean_end(daemon_factory, demo_model):
    b = LlamaCppServer(demo_model)
    try:
        g = gateway(daemon_factory, [{"url": b.url}])
        conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "model": "remote", "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 3000, "stream": True, "temperature": 0}),  # (greedy: the same tokens every run)
            {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, (r.read()[:600], b.log_tail())
        got = b""
        while got.count(b"data: ") < 3:  # the role chunk and two deltas: it is streaming
            got += r.read1(65536)
        b.kill()  # the backend dies mid-answer
        got += r.read()  # (the gateway ends its own stream properly after the error event)
        events = [line[6:] for line in got.decode().split("\n") if line.startswith("data: ")]
        assert "[DONE]" not in events
        parsed = [json.loads(e) for e in events]
        assert not any(c.get("finish_reason") for p in parsed for c in p.get("choices", ()))
        assert parsed[-1]["error"]["code"] == "backend_stream_cut"
        assert metric(g, "tidegate_remote_failures_total") == 1
        # with the backend gone: a clear 503 naming the model, not a hang
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            client(g).chat.completions.create(model="remote", messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 503 and time.monotonic() - t0 < 5
    finally:
        b.kill()


def test_a_backend_that_took_the_request_is_never_asked_again_elsewhere(daemon_factory, demo_model):
    """A backend that read the whole request and then reset the connection may be generating:
    retrying on the next backend generated twice. Only a request whose body never went out is
    retried (test_connect_errors_go_to_the_next_backend)."""
    import socket
    import threading
    other = backend_daemon(daemon_factory, demo_model)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    took = []

    def serve():  # answers health checks; reads a generation request whole, then resets
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536) or b"\r\n\r\n"
            head, _, body = data.partition(b"\r\n\r\n")
            if head.startswith(b"GET"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                conn.close()
                continue
            length = int([h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0])
            while len(body) < length:
                body += conn.recv(65536)
            took.append(body)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()  # RST
    threading.Thread(target=serve, daemon=True).start()
    try:
        g = gateway(daemon_factory, [{"url": f"http://127.0.0.1:{srv.getsockname()[1]}", "model": "demo"},
                                     {"url": f"http://127.0.0.1:{other.port}", "model": "demo"}],
                    routing="round_robin", health_interval=600)
        c = client(g)
        statuses = []
        for i in range(4):
            try:
                c.chat.completions.create(model="remote", messages=[{"role": "user", "content": f"q{i}"}],
                                          max_tokens=2)
                statuses.append(200)
            except openai.APIStatusError as e:
                statuses.append(e.status_code)
        # each request the resetting backend took is answered 502, not sent on to the other
        assert len(took) >= 1 and statuses.count(502) == len(took) == 4 - statuses.count(200), (statuses, len(took))
    finally:
        srv.close()
