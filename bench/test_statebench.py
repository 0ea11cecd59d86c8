"""pytest-benchmark: token-bucket check and ring lookup, each beside its baselines.

    python -m pytest bench/test_statebench.py --benchmark-enable --benchmark-group-by=group

Token bucket: the Cython table vs a plain-Python dict of buckets (same algorithm) vs the
`limits` package (moving window in memory, the nearest thing it offers). Target: >= 20x the
plain-Python one. Identities are pre-hashed for both of ours, as the gateway does once per request.
"""
import time

import pytest

from tidegate.core.state.ring import HashRing, hash64
from tidegate.ext.tokenbucket import BucketTable

N_IDS = 10000
IDS = [f"tenant-{i % 50}/user-{i}" for i in range(N_IDS)]
HASHES = [hash64(i.encode()) for i in IDS]


class PyBuckets:
    """The plain-Python baseline: a dict of [tokens, last] lists, refill on access."""

    def __init__(self):
        self.b = {}

    def take(self, key, n, capacity, rate):
        now = time.monotonic()
        b = self.b.get(key)
        if b is None:
            b = self.b[key] = [capacity, now]
        tokens = min(capacity, b[0] + (now - b[1]) * rate)
        b[1] = now
        if tokens >= n:
            b[0] = tokens - n
            return b[0]
        b[0] = tokens
        return -(n - tokens) / rate


def _cycle(seq):
    i = 0
    n = len(seq)
    while True:
        yield seq[i]
        i = (i + 1) % n


@pytest.mark.benchmark(group="token bucket check")
def test_bucket_cython(benchmark):
    t = BucketTable(capacity=2 * N_IDS)
    keys = _cycle(HASHES)
    benchmark(lambda: t.take(next(keys), 1.0, 100.0, 10.0))


@pytest.mark.benchmark(group="token bucket check")
def test_bucket_plain_python(benchmark):
    t = PyBuckets()
    keys = _cycle(HASHES)
    benchmark(lambda: t.take(next(keys), 1.0, 100.0, 10.0))


@pytest.mark.benchmark(group="token bucket check")
def test_bucket_limits_package(benchmark):
    limits = pytest.importorskip("limits")
    from limits.storage import MemoryStorage
    from limits.strategies import MovingWindowRateLimiter
    limiter = MovingWindowRateLimiter(MemoryStorage())
    item = limits.parse("100/10 second")
    keys = _cycle(IDS)
    benchmark(lambda: limiter.hit(item, next(keys)))


@pytest.mark.benchmark(group="token bucket check")
def test_bucket_loop_overhead(benchmark):
    """What the harness itself costs per call (lambda + next): subtract it to compare cores."""
    keys = _cycle(HASHES)
    benchmark(lambda: next(keys))


@pytest.mark.benchmark(group="ring lookup")
def test_ring_owner(benchmark):
    ring = HashRing(range(16))
    keys = _cycle([i.encode() for i in IDS])
    benchmark(lambda: ring.owner(next(keys)))


@pytest.mark.benchmark(group="token bucket: 1,000 checks")
def test_bucket_cython_batch(benchmark):
    from array import array
    t = BucketTable(capacity=2 * N_IDS)
    keys = array("Q", HASHES[:1000])
    ones, cap, rate, out = (array("d", [v] * 1000) for v in (1.0, 100.0, 10.0, 0.0))
    benchmark(t.take_batch, keys, ones, cap, rate, out)


@pytest.mark.benchmark(group="token bucket: 1,000 checks")
def test_bucket_plain_python_batch(benchmark):
    t = PyBuckets()
    keys = HASHES[:1000]

    def run():
        for k in keys:
            t.take(k, 1.0, 100.0, 10.0)
    benchmark(run)


@pytest.mark.benchmark(group="token bucket: 1,000 checks")
def test_bucket_cython_take_list(benchmark):
    """The shape the owner gets from the mesh: a list of [key, n, capacity, rate]."""
    t = BucketTable(capacity=2 * N_IDS)
    checks = [[h, 1.0, 100.0, 10.0] for h in HASHES[:1000]]
    benchmark(t.take_list, checks)
