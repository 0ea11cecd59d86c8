"""Rate-limited requests/s with the state in a Valkey/Redis Cluster vs the embedded state plane.

One run, side by side: a real cluster (3 masters + 3 replicas on loopback) and tidegate daemons
serving POST /v1/echo behind an API key with per-key and per-tenant limits set high enough that
nothing is refused (every request pays for authentication and two bucket checks):
- embedded, 1 node of 2 workers (buckets at their ring owner, one mesh hop for half of them);
- cluster, 1 node of 2 workers; cluster, 2 nodes of 1 worker each (wrk drives both at once).
Then the cost of one decision in place of a lease: owner-hop p99 over the mesh (bench/owner_hop.py
measures it alone) vs a cluster round trip (the TAKE script through valkey-glide), and the share
of admissions that needed a round trip (not spent from a lease).

    python bench/cluster_state.py [--duration 5] [--rounds 3] [--connections 64]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import load_http as L  # noqa: E402
import servers as S  # noqa: E402
from load_state import KEY, STATE, metric_counts  # noqa: E402

from helpers.redis_cluster import RedisCluster  # noqa: E402


def cluster_extra(seeds: list[str], peers: int) -> str:
    return STATE + f'[state]\nbackend = "cluster"\nseeds = {seeds!r}\nlease_peers = {peers}\n'.replace("'", '"')


def round_trips(seeds: list[str], calls: int = 3000, inflight=(1, 16)) -> dict:
    """p50/p99 ms of one bucket decision in the cluster, at 1 and 16 in flight."""
    from tidegate.core.base import config
    from tidegate.core.messaging.protocol import RL_TAKE
    from tidegate.core.state.cluster import ClusterOwners

    async def go():
        o = ClusterOwners(config.load(None, {"state.backend": "cluster", "state.seeds": seeds}))
        await o.start(10.0)
        out = {}
        for n in inflight:
            lat = []

            async def one(i):
                t0 = time.perf_counter()
                await o.call(o.owner_of(f"tenant:t{i % 64}".encode()), RL_TAKE, [[i % 64 + 1, 1.0, 1e9, 1e9]], 1.0)
                lat.append(time.perf_counter() - t0)
            sem = asyncio.Semaphore(n)

            async def bounded(i):
                async with sem:
                    await one(i)
            await asyncio.gather(*[bounded(i) for i in range(calls)])
            lat.sort()
            out[n] = (lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000)
        await o.close()
        return out
    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    S.ensure_tools("wrk")
    S.raise_nofile()
    tmp = tempfile.mkdtemp(prefix="tidegate-cluster-")
    cluster = RedisCluster(pathlib.Path(tmp) / "cluster")
    lua = os.path.join(tmp, "post.lua")
    with open(lua, "w") as f:
        f.write(L.POST_LUA + f'wrk.headers["Authorization"] = "Bearer {KEY}"\n')
    S.SERVER_CPU = S.CLIENT_CPU = "0-1"
    setups = {
        "embedded, 1 node x 2 workers": [("e", 2, STATE)],
        "cluster, 1 node x 2 workers": [("c1", 2, cluster_extra(cluster.seeds, 2))],
        "cluster, 2 nodes x 1 worker": [("c2a", 1, cluster_extra(cluster.seeds, 2)),
                                        ("c2b", 1, cluster_extra(cluster.seeds, 2))],
    }
    res: dict = {k: [] for k in setups}
    shares = {}
    try:
        for name, nodes in setups.items():
            servers = []
            for sub, workers, extra in nodes:
                os.makedirs(f"{tmp}/{sub}")
                servers.append(S.tidegate(f"{tmp}/{sub}", workers=workers, extra=extra).start())
            try:
                for rnd in range(args.rounds):
                    runs = L.wrk_many([(s.port, "/v1/echo", args.connections // len(servers), args.duration, lua)
                                       for s in servers])
                    assert all(r["non2xx"] == 0 for r in runs), runs
                    rps = sum(r["rps"] for r in runs)
                    p99 = max(r["p99_ms"] for r in runs)
                    res[name].append((rps, p99))
                    print(f"  round {rnd + 1} {name:30} {rps:>9.0f} req/s  p99 {p99:.2f} ms", flush=True)
                counts = [metric_counts(s.port, ("ratelimit_admitted_total", "ratelimit_leased_total")) for s in servers]
                admitted = sum(c["ratelimit_admitted_total"] for c in counts) or 1
                shares[name] = 1 - sum(c["ratelimit_leased_total"] for c in counts) / admitted
            finally:
                for s in servers:
                    s.stop()
        trips = round_trips(cluster.seeds)
    finally:
        cluster.stop()
    base = statistics.median(r[0] for r in res["embedded, 1 node x 2 workers"])
    for name, rows in res.items():
        rps, p99 = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        print(f"{name:30} median {rps:>9.0f} req/s ({rps / base:.2f}x embedded)  p99 {p99:.2f} ms  "
              f"round trips for {shares[name]:.0%} of admissions (the rest spent a lease or were local)")
    for n, (p50, p99) in trips.items():
        print(f"cluster round trip (TAKE script), {n:2} in flight: p50 {p50:.3f} ms  p99 {p99:.3f} ms "
              f"(mesh owner hop: python bench/owner_hop.py)")


if __name__ == "__main__":
    main()
