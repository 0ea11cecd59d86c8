"""tidegate against llama.cpp's own llama-server (and llama-cpp-python's server when installed) on
the same generated ~167M-parameter GGUF, side by side in one run, one at a time on this box.

    python bench/llm_peer.py [--tokens 32] [--rounds 3] [--device cpu|gpu] [--cpus 0-1]

  throughput   aggregate completion tokens/s with 1, 4 and 16 concurrent streams (16 slots each)
  ttft         4 tenants' ~1,500-token system prompts asked round-robin with 2 slots: time to the
               first streamed chunk (prefix tiers vs llama-server's slot prompt cache)
  constrained  tidegate, one stream: tokens/s with a json_schema response_format vs without

Targets (issue 14): >= 1.0x llama-server at every stream count, TTFT <= 0.5x of llama-server's,
constrained >= 0.8x unconstrained. llama-server is built once from the sources vendored in the
llama-cpp-python sdist (bench/llama_server.py, cached under bench/.cache).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_server  # noqa: E402
import llm_bench as B  # noqa: E402
import servers as S  # noqa: E402

from tidegate.core.llm.demo_model import make_demo  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6}}}


def _peer(name: str, tmp: str, dev, cmd) -> S.Server:
    """Start a peer server on the cores tidegate gets; cmd(port) is its command line."""
    os.makedirs(tmp, exist_ok=True)
    S.SERVER_CPU = dev.cpus
    port = S.free_port()
    srv = S.Server(name, cmd(port), port, tmp)
    srv.start()
    B.wait_model(port)
    return srv


def start_llama_server(tmp: str, model: str, slots: int, n_ctx: int, dev) -> S.Server:
    exe = llama_server.binary(cuda=dev.gpu)
    return _peer("llama-server", tmp, dev, lambda port: [
        exe, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-c", str(slots * n_ctx),
        "-t", str(dev.threads), "--no-warmup", "-ngl", "999" if dev.gpu else "0"])


def start_llama_cpp_python(tmp: str, model: str, slots: int, n_ctx: int, dev) -> S.Server:
    """llama-cpp-python's own server (one context: requests take turns; slots does not apply)."""
    return _peer("llama-cpp-python", tmp, dev, lambda port: [
        sys.executable, "-m", "llama_cpp.server", "--model", model, "--model_alias", "bench", "--host", "127.0.0.1",
        "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(dev.threads),
        "--n_threads_batch", str(dev.threads), "--n_gpu_layers", "-1" if dev.gpu else "0"])


def start_tidegate(tmp: str, model: str, slots: int, n_ctx: int, dev) -> S.Server:
    os.makedirs(tmp, exist_ok=True)
    return B.start(tmp, model, max_seqs=slots, n_ctx=n_ctx, gpu_layers="auto" if dev.gpu else 0, cpus=dev.cpus)


def has_llama_cpp_python_server() -> bool:
    try:
        import llama_cpp.server.app  # noqa: F401  (the [server] extra: fastapi, sse-starlette, …)
        return True
    except ImportError:
        return False


def streams(port: int, n: int, tokens: int, tag: str) -> float:
    """Aggregate completion tokens/s of n concurrent streams."""
    results, wall = B.concurrent(port, n, tokens, tag + " ")
    return sum(r[1] for r in results) / wall


def chat_tokens_per_s(port: int, fmt, n: int, tokens: int, tag: str) -> float:
    total, t0 = 0, time.perf_counter()
    for i in range(n):  # prompts never asked before: no cached answer
        body = {"model": "bench", "messages": [{"role": "user", "content": f"Describe parcel {tag}-{i}."}],
                "max_tokens": tokens, "temperature": 0}
        if fmt:
            body["response_format"] = fmt
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = json.loads(conn.getresponse().read())
        conn.close()
        total += r["usage"]["completion_tokens"]
    return total / (time.perf_counter() - t0)


def _cores(spec: str) -> list[int]:
    """taskset's list form ("0-1", "0,2-5") as core numbers; "all" = every core."""
    if spec == "all":
        return list(range(os.cpu_count() or 1))
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="runs per measure; the median is printed")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                    help="gpu: every peer offloads all layers (llama.cpp built with CUDA: bench/gpu.sh)")
    ap.add_argument("--cpus", default="0-1", help="the cores every server is pinned to (taskset -c)")
    args = ap.parse_args()
    cores = _cores(args.cpus)
    dev = argparse.Namespace(gpu=args.device == "gpu", cpus=",".join(map(str, cores)),
                             threads=len(os.sched_getaffinity(0) & set(cores)) or 1)
    tmp = tempfile.mkdtemp(prefix="tidegate-peer-")
    print("building the ~167M-parameter benchmark model ...", flush=True)
    model = make_demo(os.path.join(tmp, "bench.gguf"), "bench")
    print(f"llama-server: {llama_server.binary(cuda=dev.gpu)}; device {args.device}, cores {args.cpus}", flush=True)
    peers = {"tidegate": start_tidegate, "llama-server": start_llama_server}
    if has_llama_cpp_python_server():
        peers["llama-cpp-python"] = start_llama_cpp_python
    else:
        print("llama-cpp-python's server is not installed (pip install 'llama-cpp-python[server]'): skipped")
    tput: dict = {}
    for name, start in peers.items():
        srv = start(os.path.join(tmp, name + "-tput"), model, 16, 512, dev)
        try:
            streams(srv.port, 4, args.tokens, "warm")
            for n in (1, 4, 16):
                tput[(name, n)] = statistics.median(streams(srv.port, n, args.tokens, f"{name}{r}")
                                                    for r in range(args.rounds))
                print(f"  {name:13} {n:2} streams: {tput[(name, n)]:7.1f} tokens/s", flush=True)
        finally:
            srv.stop()
    ttft: dict = {}
    for name, start in peers.items():
        srv = start(os.path.join(tmp, name + "-ttft"), model, 2, 2048, dev)
        try:
            firsts = []
            for r in range(args.rounds + 1):
                for tenant in range(4):
                    f = B.stream(srv.port, B.system_prompt(tenant) + f"Question {r}?", 1)[0]
                    if r:  # round 0 only fills the caches
                        firsts.append(f)
            ttft[name] = statistics.median(firsts)
            print(f"  {name:13} TTFT, 4 tenants round-robin on 2 slots: {ttft[name] * 1000:.1f} ms", flush=True)
        finally:
            srv.stop()
    srv = start_tidegate(os.path.join(tmp, "constrained"), model, 4, 1024, dev)
    try:
        fmt = {"type": "json_schema", "json_schema": {"name": "parcel", "schema": SCHEMA}}
        plain = statistics.median(chat_tokens_per_s(srv.port, None, 4, 64, f"p{r}") for r in range(args.rounds))
        constrained = statistics.median(chat_tokens_per_s(srv.port, fmt, 4, 64, f"c{r}") for r in range(args.rounds))
    finally:
        srv.stop()
    for peer, target in (("llama-server", (">= 1.0x", "<= 0.5x")), ("llama-cpp-python", ("", ""))):
        if peer not in peers:
            continue
        print(f"\ntidegate vs {peer} ({args.device}; same GGUF, same box, medians of {args.rounds} runs)")
        for n in (1, 4, 16):
            print(f"  {n:2} streams: {tput[('tidegate', n)]:7.1f} vs {tput[(peer, n)]:7.1f} tokens/s = "
                  f"{tput[('tidegate', n)] / tput[(peer, n)]:.2f}x" + (f" (target {target[0]})" if target[0] else ""))
        print(f"  TTFT interleaved tenants: {ttft['tidegate'] * 1000:.1f} vs {ttft[peer] * 1000:.1f} ms = "
              f"{ttft['tidegate'] / ttft[peer]:.2f}x" + (f" (target {target[1]})" if target[1] else ""))
    print(f"  constrained (json_schema) vs unconstrained, tidegate: {constrained:.1f} vs {plain:.1f} tokens/s = "
          f"{constrained / plain:.2f}x (target >= 0.8x)")


if __name__ == "__main__":
    main()
