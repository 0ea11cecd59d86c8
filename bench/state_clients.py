"""Which async Valkey/Redis Cluster client the cluster state backend uses, by measurement:
valkey-glide vs redis-py's asyncio RedisCluster, side by side on one real cluster (3 masters +
3 replicas on loopback, tests/helpers/redis_cluster.py).

    python bench/state_clients.py [--calls 20000] [--inflight 64]

For each client: token-bucket script calls/s with --inflight calls in flight (median of 3),
what happens past its connection pool (all calls at once), and how long until calls succeed
again after the master of the key's slot is killed.
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
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from helpers.redis_cluster import RedisCluster  # noqa: E402
from tidegate.core.state.cluster import TAKE  # noqa: E402

ARGS = ["0", "8", "1", "1000", "1000"]


async def glide_client(seeds):
    from glide import GlideClusterClient, GlideClusterClientConfiguration, Logger, LogLevel, NodeAddress, Script
    Logger.set_logger_config(LogLevel.OFF)
    c = await GlideClusterClient.create(GlideClusterClientConfiguration(
        [NodeAddress(h, int(p)) for h, p in (s.split(":") for s in seeds)], request_timeout=500))
    script = Script(TAKE)
    return (lambda key: c.invoke_script(script, keys=[key], args=ARGS)), c.close


async def redispy_client(seeds):
    from redis.asyncio.cluster import ClusterNode, RedisCluster as RC
    c = RC(startup_nodes=[ClusterNode(h, int(p)) for h, p in (s.split(":") for s in seeds)], socket_timeout=0.5)
    await c.initialize()
    script = c.register_script(TAKE)
    return (lambda key: script(keys=[key], args=ARGS)), c.aclose


async def rate(call, n: int, inflight: int) -> float:
    sem = asyncio.Semaphore(inflight)

    async def one(i):
        async with sem:
            await call(f"tg:rl:{{t{i % 64}}}:b")
    t0 = time.perf_counter()
    await asyncio.gather(*[one(i) for i in range(n)])
    return n / (time.perf_counter() - t0)


async def unbounded(call, n: int) -> str:
    results = await asyncio.gather(*[call(f"tg:rl:{{t{i % 64}}}:b") for i in range(n)], return_exceptions=True)
    errors = [type(r).__name__ for r in results if isinstance(r, BaseException)]
    return f"{len(errors)} of {n} failed" + (f" ({errors[0]})" if errors else "")


async def recovery(call, cluster: RedisCluster) -> str:
    key = "tg:rl:{recovery}:b"
    await call(key)
    cluster.kill(cluster.master_of(key))
    t0, errors = time.monotonic(), {}
    while time.monotonic() - t0 < 30:
        try:
            await call(key)
            return f"{time.monotonic() - t0:.2f} s ({', '.join(f'{k} x{v}' for k, v in errors.items())})"
        except Exception as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            await asyncio.sleep(0.05)
    return "did not recover in 30 s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--inflight", type=int, default=64)
    args = ap.parse_args()
    out = {}
    for name, make in (("valkey-glide", glide_client), ("redis-py", redispy_client)):
        cluster = RedisCluster(pathlib.Path(tempfile.mkdtemp(prefix="tidegate-clients-")))
        try:
            async def go():
                call, close = await make(cluster.seeds)
                rates = [await rate(call, args.calls, args.inflight) for _ in range(3)]
                burst = await unbounded(call, 5000)
                rec = await recovery(call, cluster)
                await close()
                return statistics.median(rates), burst, rec
            out[name] = asyncio.run(go())
        finally:
            cluster.stop()
        r, burst, rec = out[name]
        print(f"{name:13} {r:9.0f} script calls/s at {args.inflight} in flight; 5000 at once: {burst}; "
              f"after a master is killed, calls succeed again in {rec}", flush=True)
    print(f"ratio valkey-glide / redis-py: {out['valkey-glide'][0] / out['redis-py'][0]:.2f}x")


if __name__ == "__main__":
    main()
