"""Talking to the OpenAI routes of a running daemon, and driving a Batcher without sockets."""
from __future__ import annotations

import http.client
import itertools
import json

import openai

from helpers.http import request
from tidegate.core.base import config
from tidegate.core.llm.batcher import Batcher

CT = {"Content-Type": "application/json"}


def post(d, path, body, timeout=30.0):
    return request(d.port, "POST", path, json.dumps(body).encode(), timeout=timeout)


def sse(d, path, body):
    """(status, headers, [parsed data events], raw) of a streamed request."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    conn.request("POST", path, json.dumps(body), CT)
    r = conn.getresponse()
    raw = r.read().decode()
    conn.close()
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    return r.status, dict(r.getheaders()), events, raw


def demo_llm(daemon_factory, demo_model, exact: bool = False):
    """A daemon serving the demo model as "demo" (n_ctx 1024), no semantic cache; the exact one if asked."""
    return daemon_factory(cache={"exact_enabled": exact, "semantic_enabled": False},
                          inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 1024}]})


def client(d):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key="unused", max_retries=0, timeout=30)


def metric(d, name) -> float:
    text = request(d.port, path="/metrics").body.decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


# ---- the batcher, in process -------------------------------------------------------------------
_ids = itertools.count(1)


def batcher(tmp_path, model: str, **inference) -> Batcher:
    """A Batcher on the demo model (n_ctx 1024, 4 slots) whose events collect in .events[peer]."""
    cfg = config.validate({"server": {"data_dir": str(tmp_path / "data")},
                           "inference": {"models": [{"name": "demo", "path": model, "n_ctx": 1024, "max_seqs": 4}],
                                         **inference}})
    events: dict = {}
    b = Batcher.open(model, config.models(cfg)[0], cfg["inference"], cfg["server"]["data_dir"],
                     lambda peer, ev: events.setdefault(peer, []).append(ev))
    b.events = events
    return b


def submit(b: Batcher, prompt: str, tenant: str, n: int, stream: bool = False, cls: str = "standard",
           window: int = 0) -> int:
    rid = next(_ids)
    b.submit(b"peer", rid, {"prompt": prompt, "params": {"max_tokens": n, "temperature": 0}, "tenant": tenant,
                            "cls": cls, "stream": stream, "window": window})
    return rid


def turn(b: Batcher) -> None:
    """One loop turn of the inference worker: admit, step, embeddings, save."""
    b.admit()
    if b.active:
        b.step()
    if b.embedding:
        b.embed_step()
    b.save_prefixes()


def generate(b: Batcher, prompt: str, tenant: str, n: int = 12) -> dict:
    rid = submit(b, prompt, tenant, n)
    for _ in range(1000):
        turn(b)
        for kind, r, payload in b.events.pop(b"peer", []):
            if r == rid:
                assert kind == "end", payload
                return payload
    raise AssertionError("no answer")
