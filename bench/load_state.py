"""What the state plane costs end to end: 2 workers, POST /v1/echo, with and without it.

Two tidegate daemons run side by side, each with 2 ingress workers: one with API keys and a
per-key and per-tenant rate limit (set high enough that nothing is refused, so every request
pays for authentication and two bucket checks, about half of them at the other worker over the
mesh), one with neither. wrk drives both alternately; the table shows medians over rounds and
the ratio. Target from the state-plane issue: the state plane costs under 30% of the throughput.
No CPU pinning here: two workers need both cores, so wrk shares them (the same for both sides).

    python bench/load_state.py [--duration 6] [--rounds 3] [--connections 64]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load_http as L  # noqa: E402
import servers as S  # noqa: E402

from tidegate.core.state.auth import hash_key  # noqa: E402

KEY = "sk-bench-0123456789abcdef"
STATE = f"""[auth]
keys = [{{key_sha256 = "{hash_key(KEY)}", tenant = "bench", name = "bench"}}]
[ratelimit]
key_rps = 1000000000.0
tenant_rps = 1000000000.0
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    S.ensure_tools("wrk")
    S.raise_nofile()
    import tempfile
    tmp = tempfile.mkdtemp(prefix="tidegate-state-")
    os.makedirs(f"{tmp}/plain")
    os.makedirs(f"{tmp}/state")
    plain = S.tidegate(f"{tmp}/plain", workers=2)
    state = S.tidegate(f"{tmp}/state", workers=2, extra=STATE)
    lua = os.path.join(tmp, "post.lua")
    with open(lua, "w") as f:
        f.write(L.POST_LUA + f'wrk.headers["Authorization"] = "Bearer {KEY}"\n')
    S.SERVER_CPU = S.CLIENT_CPU = "0-1"
    res: dict = {"plain": [], "state": []}
    try:
        plain.start()
        state.start()
        for rnd in range(args.rounds):
            for name, srv in (("plain", plain), ("state", state)):
                r = L.wrk(srv.port, "/v1/echo", args.connections, args.duration, lua)
                assert r["non2xx"] == 0, r
                res[name].append(r)
                print(f"  round {rnd + 1} {name:6} {r['rps']:>9.0f} req/s  p50 {r['p50_ms']:.2f} ms  "
                      f"p99 {r['p99_ms']:.2f} ms", flush=True)
        counts = metric_counts(state.port, ("ratelimit_admitted_total", "ratelimit_leased_total",
                                            "mesh_messages_sent_total"))
    finally:
        plain.stop()
        state.stop()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p50_ms", "p99_ms")} for k, v in res.items()}
    for k, v in med.items():
        print(f"{k:6} median {v['rps']:>9.0f} req/s  p50 {v['p50_ms']:.2f} ms  p99 {v['p99_ms']:.2f} ms")
    cost = 1 - med["state"]["rps"] / med["plain"]["rps"]
    admitted = counts["ratelimit_admitted_total"] or 1
    print(f"state side: {counts['ratelimit_leased_total'] / admitted:.0%} of admissions spent a leased token; "
          f"{counts['mesh_messages_sent_total'] / admitted:.2f} mesh messages per request")
    print(f"authenticated + rate-limited / plain = {med['state']['rps'] / med['plain']['rps']:.2f}x "
          f"(state plane costs {cost * 100:.0f}% of the throughput)")


def metric_counts(port: int, names) -> dict:
    """Totals from the daemon's /metrics (the supervisor sums all workers)."""
    import urllib.request
    import time
    time.sleep(1.5)  # let the last heartbeats carry the workers' counters
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for name in names:
        out[name] = sum(float(line.split()[-1]) for line in text.splitlines()
                        if line.startswith(f"tidegate_{name}"))
    return out


if __name__ == "__main__":
    main()
