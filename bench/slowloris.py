"""A normal client's latency during a slowloris at 4x max_connections, against its baseline.

One ingress worker with max_connections = 500; 2,000 attackers (half dribbling a request head a
byte every half second, half sending nothing, reconnecting whenever they are pushed out); a
normal client sends sequential GET /healthz on fresh connections. Rounds alternate baseline and
attack; medians over rounds of each round's p50 and p99, and the attack/baseline ratio (target:
p99 below 2x the baseline).

    python bench/slowloris.py [--rounds 5] [--requests 200] [--attackers 2000] [--max-connections 500]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import servers as S  # noqa: E402

from helpers.daemon import Daemon  # noqa: E402
from helpers.slowloris import Slowloris, latencies  # noqa: E402


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--attackers", type=int, default=2000)
    ap.add_argument("--max-connections", type=int, default=500)
    args = ap.parse_args()
    S.raise_nofile(args.attackers * 2 + 1000)
    d = Daemon(pathlib.Path(tempfile.mkdtemp(prefix="tidegate-slowloris-")), workers=1,
               server={"max_connections": args.max_connections}).start()
    rows = {"baseline": [], "attack": []}
    try:
        for _ in range(args.rounds):
            got = latencies(d.port, args.requests)
            rows["baseline"].append((pct(got, 0.5), pct(got, 0.99), sum(t == float("inf") for t in got)))
            with Slowloris(d.port, args.attackers) as attack:
                time.sleep(2.0)
                got = latencies(d.port, args.requests)
            rows["attack"].append((pct(got, 0.5), pct(got, 0.99), sum(t == float("inf") for t in got)))
            print(f"  round: baseline p99 {rows['baseline'][-1][1] * 1000:.2f} ms, attack p99 "
                  f"{rows['attack'][-1][1] * 1000:.2f} ms, attackers pushed out {attack.reconnects}", flush=True)
    finally:
        d.stop()
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v), sum(r[2] for r in v))
           for k, v in rows.items()}
    for k, (p50, p99, failed) in med.items():
        print(f"{k:9s} p50 {p50 * 1000:.3f} ms  p99 {p99 * 1000:.3f} ms  failed {failed}")
    print(f"attack / baseline: p50 {med['attack'][0] / med['baseline'][0]:.2f}x, "
          f"p99 {med['attack'][1] / med['baseline'][1]:.2f}x (target p99 < 2x)")


if __name__ == "__main__":
    main()
