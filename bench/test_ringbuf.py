"""pytest-benchmark: the Cython ring buffers (ext/ringbuf.pyx) beside collections.deque, on the
batches of operations the overload paths run: a window of the last 256 samples taking 1,000 new
ones and then asked for mean, p99 and the share over a threshold (breaker and pressure windows),
and a bounded FIFO offered a loop turn's 300 arrivals (taking 256) and emptied in two batches
(the per-class queues).

    python -m pytest bench/test_ringbuf.py --benchmark-enable --benchmark-group-by=group
"""
import math
from collections import deque

import numpy as np
import pytest

from tidegate.ext.ringbuf import Ring, Window

SAMPLES = np.random.default_rng(1).exponential(0.005, 1000)
SAMPLE_LIST = SAMPLES.tolist()


def window_deque():
    d = deque(maxlen=256)
    for x in SAMPLE_LIST:
        d.append(x)
    s = sorted(d)
    return sum(d) / len(d), s[math.ceil(0.99 * len(s)) - 1], sum(1 for x in d if x >= 0.01) / len(d)


def window_ring():
    w = Window(256)
    w.extend(SAMPLES)
    return w.mean(), w.percentile(99), w.share_at_least(0.01)


def window_ring_pushes():
    w = Window(256)
    push = w.push
    for x in SAMPLE_LIST:
        push(x)
    return w.mean(), w.percentile(99), w.share_at_least(0.01)


ITEMS = list(range(300))


def fifo_deque():
    """A loop turn's arrivals into a bounded queue (refusing past 256), then a batch out."""
    q = deque()
    taken = 0
    for item in ITEMS:
        if len(q) >= 256:  # bounded by hand: deque(maxlen) would drop the oldest, not refuse
            break
        q.append(item)
        taken += 1
    out = [q.popleft() for _ in range(min(64, len(q)))]
    rest = [q.popleft() for _ in range(len(q))]
    return taken, out, rest


def fifo_ring():
    q = Ring(256)
    taken = q.push_many(ITEMS)
    return taken, q.pop_many(64), q.pop_many(len(q))


@pytest.mark.benchmark(group="window: 1,000 samples then mean, p99, share")
@pytest.mark.parametrize("impl", [window_deque, window_ring, window_ring_pushes], ids=lambda f: f.__name__)
def test_window(benchmark, impl):
    mean, p99, share = benchmark(impl)
    assert 0 < mean < p99 and 0 <= share <= 1


@pytest.mark.benchmark(group="bounded fifo: 300 offered, 256 taken, out in two batches")
@pytest.mark.parametrize("impl", [fifo_deque, fifo_ring], ids=lambda f: f.__name__)
def test_fifo(benchmark, impl):
    taken, out, rest = benchmark(impl)
    assert taken == 256 and out == ITEMS[:64] and rest == ITEMS[64:256]


def test_the_two_windows_agree():
    a, b = window_deque(), window_ring()
    assert abs(a[0] - b[0]) < 1e-12 and a[1] == b[1] and a[2] == b[2]
