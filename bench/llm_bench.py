"""LLM benchmarks through the gateway, on a ~167M-parameter random llama generated on the fly.

    python bench/llm_bench.py ttft        [--samples 8]   cold vs live / RAM / disk prefix hits
    python bench/llm_bench.py throughput  [--tokens 64]   aggregate tokens/s at 1, 4, 16 streams
    python bench/llm_bench.py overhead    [--samples 30]  tidegate vs llama-cpp-python in-process
    python bench/llm_bench.py all

ttft: a ~1,500-token shared system prompt + a short distinct user message, streamed; the time to
the first SSE chunk. cold = a system prompt never seen; live = the same system prompt still in a
sequence slot; RAM = after two other requests took over the slots; disk = after the inference
worker was killed and respawned (RAM gone). Medians, printed as ratios to cold (targets: >= 20x
for live and RAM, >= 10x for disk).
throughput: N clients stream max_tokens each at once; completion tokens / wall time (target:
16 streams >= 2x one).
overhead: the same non-streamed greedy completion through tidegate and through
`llama_cpp.Llama.create_completion` in this process; p50 difference (target <= 2 ms). Uses the
tiny model too, where the gateway's share is largest. Prompts differ per call so neither side
reuses a cached prefix.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers as S  # noqa: E402

from tidegate.core.llm.demo_model import make_demo  # noqa: E402

WORDS = ("parcel delivery customs window return label invoice courier depot route weight tracking "
         "address signature postage insurance warehouse pallet freight manifest").split()


def system_prompt(seed: int, n_words: int = 975) -> str:
    """About 1,500 tokens of text, different for every seed."""
    import random
    rnd = random.Random(seed)
    return f"[{seed}] " + " ".join(rnd.choice(WORDS) for _ in range(n_words)) + ".\n"


def start(tmp: str, model: str, max_seqs: int, n_ctx: int = 2048, workers: int = 1, gpu_layers="auto",
          cpus: str = "0-1") -> S.Server:
    extra = (f'[inference]\nmodels = [{{name = "bench", path = "{model}", n_ctx = {n_ctx}, max_seqs = {max_seqs}}}]\n'
             f'reserved = {{}}\nprefix_min_tokens = 64\nn_gpu_layers = {json.dumps(gpu_layers)}\n')
    srv = S.tidegate(tmp, workers=workers, extra=extra, inference=True)
    S.SERVER_CPU = cpus
    srv.start()
    wait_model(srv.port)
    return srv


def wait_model(port: int, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if complete(port, "ping", 1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError("the model did not answer")


def complete(port: int, prompt: str, max_tokens: int) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
                                                        "temperature": 0}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    return r.status, body


def stream(port: int, prompt: str, max_tokens: int) -> tuple[float, int, float]:
    """(seconds to the first chunk, completion tokens, seconds in all) of one streamed completion."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
                                                        "temperature": 0, "stream": True,
                                                        "stream_options": {"include_usage": True}}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    first, tokens, chunks = None, 0, 0
    while True:
        line = r.fp.readline()
        if not line:
            break
        if line.startswith(b"data: ") and first is None:
            first = time.perf_counter() - t0
        if line.startswith(b"data: {") and b'"usage"' in line and b'"completion_tokens"' in line:
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        elif line.startswith(b"data: {") and b'"text":""' not in line.replace(b" ", b""):
            chunks += 1  # (a server that sends no usage chunk, llama-cpp-python's: one token a chunk)
        if line.startswith(b"data: [DONE]"):
            break
    tokens = tokens or chunks
    total = time.perf_counter() - t0
    conn.close()
    return first, tokens, total


def inference_pid(srv: S.Server) -> int:
    import psutil
    for p in psutil.Process(srv.proc.pid).children(recursive=True):
        if "inference" in " ".join(p.cmdline()) or "tidegate: inference" in p.name():
            return p.pid
    raise RuntimeError("no inference worker")


def ttft(model: str, samples: int) -> None:
    tmp = tempfile.mkdtemp(prefix="tidegate-ttft-")
    srv = start(tmp, model, max_seqs=2)
    res: dict[str, list[float]] = {"cold": [], "live": [], "ram": [], "disk": []}
    try:
        shared = system_prompt(0)
        stream(srv.port, shared + "Question zero?", 1)  # now cached in every tier
        for i in range(samples):
            res["cold"].append(stream(srv.port, system_prompt(1000 + i) + f"Question {i}?", 1)[0])
            stream(srv.port, shared + "Warm again?", 1)
            res["live"].append(stream(srv.port, shared + f"Question {i}, live?", 1)[0])
            for j in range(2):  # two other prompts take both slots: only RAM still has it
                stream(srv.port, f"Filler {i} {j}.", 1)
            res["ram"].append(stream(srv.port, shared + f"Question {i}, ram?", 1)[0])
            os.kill(inference_pid(srv), signal.SIGKILL)  # RAM and slots gone; the files stay
            time.sleep(0.5)
            wait_model(srv.port)
            res["disk"].append(stream(srv.port, shared + f"Question {i}, disk?", 1)[0])
            print(f"  sample {i + 1}: " + "  ".join(f"{k} {v[-1] * 1000:.1f} ms" for k, v in res.items()), flush=True)
    finally:
        srv.stop()
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"TTFT, ~1,500-token shared system prompt, medians of {samples}:")
    for k in ("cold", "live", "ram", "disk"):
        ratio = "" if k == "cold" else f"  {med['cold'] / med[k]:.1f}x faster than cold"
        print(f"  {k:5} {med[k] * 1000:9.1f} ms{ratio}")


def concurrent(port: int, n: int, tokens: int, tag: str = "") -> tuple[list, float]:
    """n streamed completions at once: ([(first chunk s, tokens, total s)], wall seconds)."""
    results = []

    def one(i):
        results.append(stream(port, f"Stream {tag}{n}-{i}: tell me about parcels.", tokens))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def throughput(model: str, tokens: int) -> None:
    tmp = tempfile.mkdtemp(prefix="tidegate-tput-")
    srv = start(tmp, model, max_seqs=16, n_ctx=512)
    out = {}
    try:
        for n in (1, 4, 16):
            results, wall = concurrent(srv.port, n, tokens)
            total = sum(r[1] for r in results)
            out[n] = total / wall
            print(f"  {n:2} streams: {total} tokens in {wall:.2f} s = {out[n]:.1f} tokens/s "
                  f"(first chunk median {statistics.median(r[0] for r in results) * 1000:.0f} ms)", flush=True)
    finally:
        srv.stop()
    print(f"aggregate tokens/s, 16 streams vs 1: {out[16] / out[1]:.2f}x;  4 vs 1: {out[4] / out[1]:.2f}x")


def overhead(model: str, samples: int, label: str) -> None:
    import llama_cpp
    tmp = tempfile.mkdtemp(prefix="tidegate-ovh-")
    prompts = [f"Request {i}: summarise the parcel policy." for i in range(samples * 2 + 2)]
    gw, direct = [], []
    srv = start(tmp, model, max_seqs=4, n_ctx=512)
    try:
        complete(srv.port, "warm up", 8)
        for p in prompts[:samples]:
            t0 = time.perf_counter()
            status, _ = complete(srv.port, p, 16)
            gw.append(time.perf_counter() - t0)
            assert status == 200
    finally:
        srv.stop()
    llm = llama_cpp.Llama(model, n_ctx=512, n_threads=os.cpu_count(), verbose=False)
    llm.create_completion("warm up", max_tokens=8, temperature=0)
    for p in prompts[samples:2 * samples]:
        t0 = time.perf_counter()
        llm.create_completion(p, max_tokens=16, temperature=0)
        direct.append(time.perf_counter() - t0)
    g, d = statistics.median(gw), statistics.median(direct)
    print(f"  {label}: non-streamed 16-token completion, p50 through tidegate {g * 1000:.2f} ms, "
          f"llama-cpp-python in-process {d * 1000:.2f} ms: the gateway adds {(g - d) * 1000:+.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["ttft", "throughput", "overhead", "all"])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="tidegate-models-")
    print("building the ~167M-parameter benchmark model ...", flush=True)
    big = make_demo(os.path.join(tmp, "bench.gguf"), "bench")
    if args.what in ("ttft", "all"):
        ttft(big, args.samples)
    if args.what in ("throughput", "all"):
        throughput(big, args.tokens)
    if args.what in ("overhead", "all"):
        tiny = make_demo(os.path.join(tmp, "tiny.gguf"), "tiny")
        overhead(tiny, max(args.samples, 30), "tiny model")
        overhead(big, max(args.samples, 10), "bench model")


if __name__ == "__main__":
    main()
