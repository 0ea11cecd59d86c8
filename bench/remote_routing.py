"""Prefix-affinity routing vs round robin over 2 remote backends (core/llm/remote.py).

Two tidegate daemons serve the ~167M-parameter random llama (bench/llm_bench.py's) as remote
backends, one core each, with a KV budget that holds four of the prompts apiece (measured: the
KV cells of n_ctx 2048, one parked prefix, a 64 MiB RAM tier, no disk tier); a gateway tidegate serves them as one remote model. 8 tenants,
each with its own ~400-token system prompt, ask in a seeded random order
(2 clients at once); each request streams a short answer and its time to the first chunk is
kept. Prefix affinity can keep each tenant where its prompt is cached (4 + 4 fit); round robin
sends every tenant to both, and the caches thrash. Fresh backends for each routing, same order;
each tenant asks once first (a warm-up, not measured: the steady state is what is compared).

    python bench/remote_routing.py [--requests 64] [--model PATH]

Prints TTFT p50/p90 per routing, the prefix-hit share (prompt tokens the backend answered from
its cache, from usage.prompt_tokens_details.cached_tokens; and the gateway's view: blocks the
chosen backend had been sent before, which round robin also scores high while the backends
evict them) and the ratio. Target from the issue: p90 TTFT >= 2x better than round robin.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import llm_bench as B  # noqa: E402
import servers as S  # noqa: E402
from load_state import metric_counts  # noqa: E402

BACKEND = """[inference]
models = [{{name = "bench", path = "{model}", n_ctx = 2048, max_seqs = 2, threads = 1}}]
reserved = {{}}
prefix_min_tokens = 64
prefix_live_entries = 1
prefix_ram_bytes = 67108864
prefix_disk_bytes = 0
n_gpu_layers = 0
[cache]
exact_enabled = false
semantic_enabled = false
"""
GATEWAY = """[inference]
models = [{{name = "bench", routing = "{routing}", backends = [{backends}]}}]
[cache]
exact_enabled = false
semantic_enabled = false
"""


def chat_ttft(port: int, system: str, user: str) -> tuple[float, int, int]:
    """(seconds to the first chunk, prompt tokens, of those cached at the backend)."""
    import http.client
    import time
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": "bench", "max_tokens": 4, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}),
        {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    first, prompt, cached = None, 0, 0
    while True:
        line = r.fp.readline()
        if not line or line.startswith(b"data: [DONE]"):
            break
        if line.startswith(b"data: {") and b'"usage":{' in line.replace(b" ", b""):
            u = json.loads(line[6:])["usage"]
            prompt, cached = u["prompt_tokens"], (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        elif first is None and line.startswith(b"data: {") and b'"content":""' not in line.replace(b" ", b""):
            first = time.perf_counter() - t0
    conn.close()
    return first, prompt, cached


def run(routing: str, model: str, order: list[int], prompts: list[str], tmp: str) -> dict:
    backends = []
    for i in range(2):
        d = f"{tmp}/{routing}-b{i}"
        os.makedirs(d)
        S.SERVER_CPU = str(i)
        backends.append(S.tidegate(d, extra=BACKEND.format(model=model), inference=True).start())
    for b in backends:
        B.wait_model(b.port)
    d = f"{tmp}/{routing}-gw"
    os.makedirs(d)
    S.SERVER_CPU = "0-1"
    urls = ", ".join(f'{{url = "http://127.0.0.1:{b.port}"}}' for b in backends)
    gw = S.tidegate(d, extra=GATEWAY.format(routing=routing, backends=urls), inference=True).start()
    ttfts: list[float] = []
    tokens = [0, 0]  # prompt tokens, of those cached at the backend
    lock = threading.Lock()
    for tenant in range(len(prompts)):  # warm-up, not measured: each tenant once (the same for both routings)
        chat_ttft(gw.port, prompts[tenant], "Warm-up question.")
    todo = list(enumerate(order))
    try:
        def client():
            while True:
                with lock:
                    if not todo:
                        return
                    i, tenant = todo.pop(0)
                t, prompt, cached = chat_ttft(gw.port, prompts[tenant], f"Question {i}: what does clause {i % 7} say?")
                with lock:
                    ttfts.append(t)
                    tokens[0] += prompt
                    tokens[1] += cached
                    if os.environ.get("ROUTING_DEBUG"):
                        print(f"    {routing} #{i} tenant {tenant}: {t * 1000:.0f} ms", flush=True)
        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m = metric_counts(gw.port, ("remote_prefix_blocks_hit_total", "remote_prefix_blocks_total"))
    finally:
        gw.stop()
        for b in backends:
            b.stop()
    ttfts.sort()
    return {"p50": statistics.median(ttfts) * 1000, "p90": ttfts[int(len(ttfts) * 0.9)] * 1000,
            "hit": m["remote_prefix_blocks_hit_total"] / max(1, m["remote_prefix_blocks_total"]),
            "cached": tokens[1] / max(1, tokens[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--model", default="", help="the bench GGUF (made when not given)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="tidegate-routing-")
    model = args.model
    if not model:
        from tidegate.core.llm.demo_model import make_demo
        model = make_demo(os.path.join(tmp, "bench.gguf"), "bench")
    prompts = [f"You are the assistant of tenant {t}. " + B.system_prompt(100 + t, 250) for t in range(8)]
    rnd = random.Random(7)
    order = [rnd.randrange(8) for _ in range(args.requests)]
    res = {}
    for routing in ("prefix", "round_robin"):
        res[routing] = run(routing, model, order, prompts, tmp)
        r = res[routing]
        print(f"{routing:12} TTFT p50 {r['p50']:8.1f} ms  p90 {r['p90']:8.1f} ms  prompt tokens the backend had "
              f"cached {r['cached']:.0%}  (prefix blocks sent to that backend before: {r['hit']:.0%})", flush=True)
    p, rr = res["prefix"], res["round_robin"]
    print(f"prefix affinity vs round robin: p50 {rr['p50'] / p['p50']:.2f}x better, p90 {rr['p90'] / p['p90']:.2f}x "
          f"better (target p90 >= 2x)")


if __name__ == "__main__":
    main()
