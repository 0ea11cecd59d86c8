"""Response-cache benchmarks.

    python bench/cache_bench.py [--requests 2000] [--entries 100000]

1. exact hits through the gateway (1 ingress worker, keep-alive, one request at a time): client
   p50/p99, and the server-side share answered within 1 ms from the /metrics histogram
   (target: p99 < 1 ms server-side);
2. semantic hits through the gateway (paraphrases; embedding + k-NN + verifier in the embedder
   process): client p50/p99 and server-side buckets (target: p99 < 5 ms);
3. embedding throughput, WordLlama: one text per call (what each ingress worker alone would
   send) vs batches of 16 and 64 (what the embedder gets when it gathers a loop turn's texts
   from all workers);
4. memory per 100k entries: the semantic store (256-d vectors in hnswlib + payloads) and the
   exact store, as RSS growth of this process, plus the semantic store's bytes on disk.
"""
from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers as S  # noqa: E402

from tidegate.core.llm.demo_model import make_demo  # noqa: E402

QUESTIONS = ["How do I reset my password?", "How do I cancel my subscription?", "Where is my parcel right now?",
             "What are the side effects of ibuprofen?", "How do I convert Celsius to Fahrenheit?"]
PARAPHRASES = ["How can I reset my password?", "How do I cancel my subscription please?",
               "Where is my parcel right now please?", "What are the common side effects of ibuprofen?",
               "How can I convert Celsius to Fahrenheit?"]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def chat(conn, text):
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": text}], "max_tokens": 8,
                       "temperature": 0})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    return time.perf_counter() - t0, r.getheader("x-tidegate-cache")


def server_buckets(port) -> dict:
    """Cumulative counts of the chat route's latency histogram, by upper bound."""
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith('tidegate_http_request_duration_seconds_bucket{') and "/v1/chat/completions" in line:
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.split()[-1])
    return out


def within(before, after, bound: str) -> float:
    n = after["+Inf"] - before.get("+Inf", 0)
    return (after[bound] - before.get(bound, 0)) / n if n else float("nan")


def gateway(n: int) -> None:
    tmp = tempfile.mkdtemp(prefix="tidegate-cache-")
    model = make_demo(os.path.join(tmp, "tiny.gguf"))
    srv = S.tidegate(tmp, workers=1, inference=True, extra=(
        f'[inference]\nmodels = [{{name = "bench", path = "{model}", n_ctx = 512}}]\n'
        '[cache]\nsemantic_timeout = 0.5\n'))
    S.SERVER_CPU = "0-1"
    srv.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                chat(conn, "warm up")
                break
            except (OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
                time.sleep(0.3)
        for q in QUESTIONS:
            assert chat(conn, q)[1] == "miss"
        time.sleep(0.5)  # inserts reach the embedder
        for kind, texts in (("exact", QUESTIONS), ("semantic", PARAPHRASES)):
            before = server_buckets(srv.port)
            lat = []
            for i in range(n):
                t, how = chat(conn, texts[i % len(texts)])
                assert how == kind, (kind, how, texts[i % len(texts)])
                lat.append(t)
            time.sleep(1.0)  # a heartbeat carries the counts
            after = server_buckets(srv.port)
            print(f"  {kind:8} hits, {n} sequential on keep-alive: client p50 {pct(lat, .5) * 1e3:.3f} ms, "
                  f"p99 {pct(lat, .99) * 1e3:.3f} ms; server-side within 1 ms: {within(before, after, '0.001'):.1%}, "
                  f"within 2.5 ms: {within(before, after, '0.0025'):.1%}, within 5 ms: "
                  f"{within(before, after, '0.005'):.1%}", flush=True)
    finally:
        srv.stop()


def embed_throughput() -> None:
    from tidegate.core.cache.embedders import WordLlamaEmbedder
    emb = WordLlamaEmbedder()
    texts = [f"{q} (variant {i})" for i in range(256) for q in QUESTIONS][:1024]
    for size in (1, 16, 64):
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(0, len(texts), size):
                emb.embed(texts[i:i + size])
            runs.append(len(texts) / (time.perf_counter() - t0))
        print(f"  embed, batches of {size:2}: {statistics.median(runs):9.0f} texts/s")


def anon_rss() -> int:
    """Anonymous resident memory (heap, hnswlib): RSS would also count LMDB's file pages."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return psutil.Process().memory_info().rss


def memory(entries: int) -> None:
    from tidegate.core.cache.exact import ExactStore
    from tidegate.core.cache.semantic_store import SemanticStore
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp(prefix="tidegate-mem-")
    gc.collect()
    rss0 = anon_rss()
    store = SemanticStore(tmp, 256, max_bytes=8 << 30)
    answer = {"text": "x" * 200, "finish_reason": "stop", "usage": {"prompt_tokens": 20, "completion_tokens": 50,
                                                                   "total_tokens": 70, "cached_tokens": 0}}
    t0 = time.perf_counter()
    for i in range(entries):
        v = rng.standard_normal(256).astype(np.float32)
        v /= np.linalg.norm(v)
        store.insert(f"ns{i % 10}", "t", v, f"question number {i} about parcels", answer, 3600, entries)
    ins = (time.perf_counter() - t0) / entries
    store.save()
    gc.collect()
    rss1 = anon_rss()
    disk = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(tmp) for f in fs)
    q = rng.standard_normal((200, 256)).astype(np.float32)
    t0 = time.perf_counter()
    for v in q:
        store.lookup("ns0", v / np.linalg.norm(v), "question", 0.99)
    look = (time.perf_counter() - t0) / len(q)
    print(f"  semantic store, {entries} entries (200-char answers, 10 namespaces): anonymous RSS +{(rss1 - rss0) / 2**20:.0f} MiB "
          f"({(rss1 - rss0) / entries:.0f} B/entry), {disk / 2**20:.0f} MiB on disk; insert {ins * 1e3:.2f} ms, "
          f"k-NN lookup {look * 1e3:.3f} ms")
    del store
    gc.collect()
    rss2 = anon_rss()
    ex = ExactStore(max_bytes=16 << 30, ttl=3600)
    for i in range(entries):
        ex.put([f"{i:064x}", "t", answer])
    gc.collect()
    rss3 = anon_rss()
    print(f"  exact store, {entries} entries: anonymous RSS +{(rss3 - rss2) / 2**20:.0f} MiB ({(rss3 - rss2) / entries:.0f} B/entry), "
          f"counted {ex.bytes / 2**20:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--entries", type=int, default=100000)
    args = ap.parse_args()
    print("through the gateway:")
    gateway(args.requests)
    print("embedding:")
    embed_throughput()
    print("memory:")
    memory(args.entries)


if __name__ == "__main__":
    main()
