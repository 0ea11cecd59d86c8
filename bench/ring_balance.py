"""Ring balance and key movement over 1M keys (the state-plane issue asks for max/mean load).

    python bench/ring_balance.py [--keys 1000000] [--vnodes 160]
"""
import argparse
import collections
import time

from tidegate.core.state.ring import HashRing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--vnodes", type=int, default=512)
    args = ap.parse_args()
    keys = [b"user-%d" % i for i in range(args.keys)]
    print(f"{'workers':>7} {'max/mean':>9} {'min/mean':>9} {'moved when +1':>14} {'ideal':>7} {'lookup us':>10}")
    for n in (2, 4, 8, 16):
        ring, bigger = HashRing(range(n), args.vnodes), HashRing(range(n + 1), args.vnodes)
        t = time.perf_counter()
        owners = [ring.owner(k) for k in keys]
        per = (time.perf_counter() - t) / len(keys) * 1e6
        load = collections.Counter(owners)
        mean = len(keys) / n
        moved = sum(1 for k, o in zip(keys, owners) if bigger.owner(k) != o) / len(keys)
        print(f"{n:>7} {max(load.values()) / mean:>9.3f} {min(load.values()) / mean:>9.3f} {moved:>14.3f} "
              f"{1 / (n + 1):>7.3f} {per:>10.2f}")


if __name__ == "__main__":
    main()
