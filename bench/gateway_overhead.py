"""What the proxy path itself costs: the same fast backend asked directly, through tidegate (a
remote model, caches off, one ingress worker) and through LiteLLM's proxy (the peer users pick;
a bench-only dependency, installed into its own venv: --litellm PATH/bin/litellm).

The backend is nginx answering a fixed chat completion (JSON for whole answers, SSE for streams:
tidegate always asks its backends to stream) from CPU 1, beside wrk; the gateways run on CPU 0.
Printed per target and connection count: requests/s, p50/p99 (wrk), the gateway's CPU per
request (all its processes), and its RSS before and after; then streamed first/last-chunk
latency (sequential, a Python client) and the ratios against LiteLLM.

    python bench/gateway_overhead.py [--duration 5] [--connections 1,16,64] [--litellm /tmp/litellm-venv/bin/litellm]
    python bench/gateway_overhead.py --soak 600      # RSS each minute over 10 minutes at 16 connections
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers as S  # noqa: E402

BODY = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8}
WHOLE = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "Hello there, how are you?"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})
SSE = "".join("data: " + json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                      "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}) + "\\n\\n"
              for w in ["Hello", " there", ",", " how", " are", " you", "?"])
SSE += "data: " + json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}) + "\\n\\n"
SSE += "data: [DONE]\\n\\n"
POST_LUA = f"""wrk.method = "POST"
wrk.body = {json.dumps(json.dumps(BODY))}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
"""


def nginx_backend(tmp: str) -> S.Server:
    port = S.free_port()
    conf = os.path.join(tmp, "backend.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {tmp}/backend.pid; error_log {tmp}/backend.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port} reuseport backlog=4096;
    location = /direct/v1/models {{ default_type application/json; return 200 '{{"data": []}}'; }}
    location = /sse/v1/models {{ default_type application/json; return 200 '{{"data": []}}'; }}
    location = /direct/v1/chat/completions {{ default_type application/json; return 200 '{WHOLE}'; }}
    location = /sse/v1/chat/completions {{ default_type text/event-stream; return 200 "{SSE.replace('"', chr(92) + '"')}"; }}
  }} }}""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    srv = S.Server("backend", [nginx, "-c", conf, "-p", tmp], port, tmp)
    srv.cpu = S.CLIENT_CPU
    return srv


def tidegate(tmp: str, backend: int) -> S.Server:
    extra = ('[cache]\nexact_enabled = false\nsemantic_enabled = false\n'
             f'[inference]\nmax_inflight = 100000\n[[inference.models]]\nname = "m"\n'
             f'backends = [{{url = "http://127.0.0.1:{backend}/sse", model = "m", max_inflight = 100000}}]\n'
             'health_interval = 60.0\n')
    return S.tidegate(tmp, workers=1, extra=extra, inference=True)


def litellm(tmp: str, backend: int, exe: str) -> S.Server:
    port = S.free_port()
    conf = os.path.join(tmp, "litellm.yaml")
    with open(conf, "w") as f:
        f.write(f"""model_list:
  - model_name: m
    litellm_params: {{model: openai/m, api_base: "http://127.0.0.1:{backend}/direct/v1", api_key: x}}
  - model_name: m-stream
    litellm_params: {{model: openai/m, api_base: "http://127.0.0.1:{backend}/sse/v1", api_key: x}}
litellm_settings: {{drop_params: true, telemetry: false}}
""")
    env_cmd = ["env", "LITELLM_LOG=ERROR", "LITELLM_TELEMETRY=False", "LITELLM_MASTER_KEY=sk-bench", exe, "--config", conf, "--port", str(port),
               "--num_workers", "1"]
    return S.Server("litellm", env_cmd, port, tmp)


def wrk(port: int, path: str, conns: int, duration: int, lua: str) -> dict:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "10s", "-s", lua,
           f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(S.pinned(cmd, S.CLIENT_CPU), capture_output=True, text=True).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "requests": total,
            "p50_ms": _ms(re.search(r"\s50%\s+(\S+)", out).group(1)),
            "p99_ms": _ms(re.search(r"\s99%\s+(\S+)", out).group(1)),
            "non2xx": int(non2xx.group(1)) if non2xx else 0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def tree(srv: S.Server) -> list:
    root = psutil.Process(srv.proc.pid)
    return [root, *root.children(recursive=True)]


def cpu_s(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def rss_mb(procs) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def streamed(port: int, path: str, model: str, n: int = 50) -> tuple[float, float]:
    """Median first-chunk and last-chunk latency (ms) of n sequential streamed requests."""
    first, last = [], []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps(dict(BODY, model=model, stream=True))
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", path, body, {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"})
        r = conn.getresponse()
        got = r.read1(65536)
        first.append((time.perf_counter() - t0) * 1000)
        while not got.rstrip().endswith(b"[DONE]"):
            more = r.read1(65536)
            if not more:
                break
            got += more
        r.read()
        last.append((time.perf_counter() - t0) * 1000)
    conn.close()
    return statistics.median(first), statistics.median(last)


def soak(tmp: str, backend, lua: str, seconds: int) -> None:
    srv = tidegate(tmp, backend.port).start()
    try:
        time.sleep(1.0)
        procs = tree(srv)
        print("minute  rss MB (all processes)   req/s", flush=True)
        print(f"{0:6}  {rss_mb(procs):8.1f}", flush=True)
        for m in range(max(1, seconds // 60)):
            r = wrk(srv.port, "/v1/chat/completions", 16, 60, lua)
            print(f"{m + 1:6}  {rss_mb(procs):8.1f}   {r['rps']:8.0f}  non2xx {r['non2xx']}", flush=True)
    finally:
        srv.stop()
        backend.proc.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", default="1,16,64")
    ap.add_argument("--litellm", default=shutil.which("litellm") or "/tmp/litellm-venv/bin/litellm")
    ap.add_argument("--soak", type=int, default=0, help="seconds: instead, tidegate alone at 16 connections that "
                    "long, its RSS each minute (held per finished request shows as growth)")
    args = ap.parse_args()
    S.ensure_tools("wrk", "nginx")
    S.raise_nofile()
    tmp = tempfile.mkdtemp(prefix="overhead-")
    lua = os.path.join(tmp, "post.lua")
    with open(lua, "w") as f:
        f.write(POST_LUA)
    backend = nginx_backend(tmp)
    backend.proc = subprocess.Popen(S.pinned(backend.cmd, S.CLIENT_CPU), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, cwd=tmp)
    S.wait_port(backend.port)
    if args.soak:
        return soak(tmp, backend, lua, args.soak)
    targets = [("direct", None, "/direct/v1/chat/completions", "/sse/v1/chat/completions", "m"),
               ("tidegate", tidegate(tmp, backend.port), "/v1/chat/completions", "/v1/chat/completions", "m")]
    if os.path.exists(args.litellm):
        targets.append(("litellm", litellm(tmp, backend.port, args.litellm), "/v1/chat/completions",
                        "/v1/chat/completions", "m-stream"))
    else:
        print(f"(no LiteLLM at {args.litellm}: python3 -m venv /tmp/litellm-venv && "
              "/tmp/litellm-venv/bin/pip install 'litellm[proxy]')")
    rows = {}
    try:
        print(f"{'target':9} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms/req':>10} {'rss MB':>13} "
              f"{'non2xx':>6}", flush=True)
        for name, srv, path, spath, smodel in targets:
            port = backend.port if srv is None else srv.start(timeout=180.0).port  # (LiteLLM starts slowly)
            if srv is not None:
                for _ in range(100):  # ready: it answers a completion
                    try:
                        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                        c.request("POST", path, json.dumps(BODY), {"Content-Type": "application/json"})
                        if c.getresponse().status == 200:
                            break
                    except OSError:
                        pass
                    time.sleep(0.3)
            procs = tree(srv) if srv is not None else tree(backend)
            before = rss_mb(procs)
            for conns in [int(c) for c in args.connections.split(",")]:
                c0 = cpu_s(procs)
                r = wrk(port, path, conns, args.duration, lua)
                r["cpu_ms"] = (cpu_s(procs) - c0) * 1000 / max(1, r["requests"])
                rows[(name, conns)] = r
                print(f"{name:9} {conns:5} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['cpu_ms']:10.3f} "
                      f"{before:6.0f}->{rss_mb(procs):5.0f} {r['non2xx']:6}", flush=True)
            f, last = streamed(port, spath, smodel)
            rows[(name, "stream")] = (f, last)
            print(f"{name:9} streamed: first chunk {f:.2f} ms, last chunk {last:.2f} ms (medians of 50)", flush=True)
            if srv is not None:
                srv.stop()
        print()
        for conns in [int(c) for c in args.connections.split(",")]:
            d, t = rows[("direct", conns)], rows[("tidegate", conns)]
            line = f"{conns:3} conns: tidegate adds {t['p50_ms'] - d['p50_ms']:.2f} ms at p50"
            if ("litellm", conns) in rows:
                lt = rows[("litellm", conns)]
                line += (f", LiteLLM {lt['p50_ms'] - d['p50_ms']:.2f} ms; req/s tidegate/LiteLLM "
                         f"{t['rps'] / max(1e-9, lt['rps']):.1f}x; cpu/req LiteLLM/tidegate "
                         f"{lt['cpu_ms'] / max(1e-9, t['cpu_ms']):.1f}x")
            print(line)
    finally:
        backend.proc.terminate()


if __name__ == "__main__":
    main()
