"""Cost of an owner hop over the ZeroMQ mesh: round-trip p50/p99 and calls/s under load.

Two processes (two mesh members, each on its own uvloop, pinned to separate cores when there are
two). Member 0 runs C concurrent callers against keys owned by member 1 for a few seconds; the
mesh packs what each loop turn queues into one frame. Compared side by side: the same calls at
concurrency 1 (one message per frame: the unbatched cost) and a local (owner == self) call.
Target from the state-plane issue: p99 of an owner hop under load below 2 ms.

    python bench/owner_hop.py [--seconds 3] [--concurrency 1,16,128]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import tempfile
import time


def owner(run_dir: str, ready, stop) -> None:
    import uvloop

    from tidegate.core.messaging.mesh import Mesh
    if os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})
    counters: dict = {}

    def incr(p):
        counters[p] = counters.get(p, 0) + 1
        return counters[p]

    async def main():
        m = Mesh(1, 2, run_dir, {"incr": incr}, 1 << 20)
        m.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        m.close()
    uvloop.run(main())


def asker(run_dir: str, seconds: float, concurrency: list[int]) -> list[tuple]:
    import uvloop

    from tidegate.core.messaging.mesh import Mesh
    if os.cpu_count() > 1:
        os.sched_setaffinity(0, {0})
    rows = []

    async def main():
        m = Mesh(0, 2, run_dir, {"incr": lambda p: p}, 1 << 20)
        m.start()
        await asyncio.sleep(0.2)
        for target, label in ((1, "remote"), (0, "local")):
            for c in concurrency if target == 1 else [1]:
                lat: list[float] = []
                end = time.monotonic() + seconds
                frames0, msgs0 = m.stats["frames_out"], m.stats["messages_out"]

                async def worker(i):
                    n = 0
                    while time.monotonic() < end:
                        t = time.perf_counter()
                        if target == 1:
                            await m.request(target, "incr", f"k{i}-{n % 100}", timeout=1.0)
                        else:  # (a key this worker owns: a direct call, as Owners.call makes it)
                            m.handlers["incr"](f"k{i}-{n % 100}")
                            await asyncio.sleep(0)
                        lat.append(time.perf_counter() - t)
                        n += 1
                t0 = time.monotonic()
                await asyncio.gather(*(worker(i) for i in range(c)))
                el = time.monotonic() - t0
                lat.sort()
                rows.append((label, c, len(lat) / el, statistics.median(lat) * 1e6, lat[int(len(lat) * 0.99)] * 1e6,
                             (m.stats["messages_out"] - msgs0) / max(1, m.stats["frames_out"] - frames0)))
        m.close()
    uvloop.run(main())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--concurrency", default="1,16,128")
    args = ap.parse_args()
    run_dir = tempfile.mkdtemp(prefix="tidegate-hop-")
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    p = ctx.Process(target=owner, args=(run_dir, ready, stop))
    p.start()
    ready.wait(20)
    try:
        rows = asker(run_dir, args.seconds, [int(c) for c in args.concurrency.split(",")])
    finally:
        stop.set()
        p.join(10)
    print(f"{'call':7} {'callers':>7} {'calls/s':>10} {'p50 us':>9} {'p99 us':>9} {'msgs/frame':>11}")
    for label, c, rate, p50, p99, per_frame in rows:
        print(f"{label:7} {c:>7} {rate:>10.0f} {p50:>9.0f} {p99:>9.0f} {per_frame:>11.1f}")
    base = next(r for r in rows if r[0] == "remote" and r[1] == 1)
    for r in rows:
        if r[0] == "remote" and r[1] > 1:
            print(f"batching at {r[1]} callers: {r[2] / base[2]:.1f}x the calls/s of one-at-a-time")


if __name__ == "__main__":
    main()
