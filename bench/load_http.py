"""Throughput and latency of tidegate vs uvicorn (bare ASGI) vs nginx, one worker each.

Each server is pinned to CPU 0 and wrk to CPU 1. Rounds interleave the servers so that noise on
a shared machine hits all of them alike; the table shows medians over rounds and the ratios
the foundation issue targets (tidegate >= 3x uvicorn and >= 0.6x nginx, p99 below uvicorn's).

    python bench/load_http.py [--duration 8] [--rounds 3] [--connections 50,1000]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers as S  # noqa: E402

POST_LUA = """wrk.method = "POST"
wrk.body = '{"model":"demo","messages":[{"role":"user","content":"How far is the moon?"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
"""
PATHS = {"get": {"tidegate": "/healthz", "uvicorn": "/healthz", "nginx": "/healthz"},
         "post": {"tidegate": "/v1/echo", "uvicorn": "/v1/echo", "nginx": "/v1/echo"}}


def to_ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def wrk(port: int, path: str, conns: int, duration: int, lua: str | None) -> dict:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    if lua:
        cmd += ["-s", lua]
    out = subprocess.run(S.pinned(cmd + [f"http://127.0.0.1:{port}{path}"], S.CLIENT_CPU), capture_output=True,
                         text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = to_ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors.group(1) if errors else "",
            "non2xx": int(non2xx.group(1)) if non2xx else 0}


def wrk_many(runs: list[tuple]) -> list[dict]:
    """wrk(*args) for each of runs at the same time (several nodes driven together)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(lambda a: wrk(*a), runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", default="50,1000")
    ap.add_argument("--servers", default="tidegate,uvicorn,nginx")
    args = ap.parse_args()
    S.ensure_tools("wrk", "nginx")
    S.raise_nofile()
    names = args.servers.split(",")
    tmp, servers = S.make_all(names)
    lua = os.path.join(tmp, "post.lua")
    with open(lua, "w") as f:
        f.write(POST_LUA)
    results: dict = {}
    try:
        for s in servers.values():
            s.start()
        for conns in [int(c) for c in args.connections.split(",")]:
            for kind in ("get", "post"):
                for rnd in range(args.rounds):
                    for name, s in servers.items():
                        r = wrk(s.port, PATHS[kind][name], conns, args.duration, lua if kind == "post" else None)
                        results.setdefault((conns, kind, name), []).append(r)
                        print(f"  c={conns:<5} {kind:4} round {rnd + 1} {name:9} {r['rps']:>9.0f} req/s  "
                              f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms {r['errors']}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    print(f"\nmedians over {args.rounds} rounds of {args.duration}s (one worker per server, wrk on another core)")
    print(f"{'conns':>5} {'kind':4} {'server':9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    summary = {}
    for (conns, kind, name), runs in sorted(results.items()):
        med = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_ms", "p99_ms")}
        summary[f"{conns}/{kind}/{name}"] = med
        print(f"{conns:>5} {kind:4} {name:9} {med['rps']:>9.0f} {med['p50_ms']:>8.2f} {med['p99_ms']:>8.2f}")
    print("\nratios (tidegate / baseline, req/s medians; p99: lower is better)")
    for conns in sorted({k[0] for k in results}):
        for kind in ("get", "post"):
            t = summary.get(f"{conns}/{kind}/tidegate")
            if not t:
                continue
            parts = []
            for base in ("uvicorn", "nginx"):
                b = summary.get(f"{conns}/{kind}/{base}")
                if b:
                    parts.append(f"vs {base}: {t['rps'] / b['rps']:.2f}x")
            u = summary.get(f"{conns}/{kind}/uvicorn")
            if u:
                parts.append(f"p99 {t['p99_ms']:.2f} ms vs uvicorn {u['p99_ms']:.2f} ms")
            print(f"  c={conns:<5} {kind:4} " + "   ".join(parts))
    os.makedirs(os.path.join(S.HERE, "results"), exist_ok=True)
    path = os.path.join(S.HERE, "results", f"load_http-{int(time.time())}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nraw medians written to {path}")


if __name__ == "__main__":
    main()
