"""ext/ringbuf: the window keeps exactly the last `capacity` samples; the FIFO refuses when full
and hands items back in order, holding references correctly."""
import sys

import numpy as np
import pytest

from tidegate.ext.ringbuf import Ring, Window


def test_window_is_the_last_capacity_samples():
    w = Window(5)
    assert (len(w), w.mean(), w.percentile(99), w.share_at_least(1)) == (0, 0.0, 0.0, 0.0)
    xs = np.random.default_rng(3).normal(size=37)
    w.extend(xs[:30])
    for x in xs[30:]:
        w.push(float(x))
    last = np.sort(xs[-5:])
    assert len(w) == 5 and w.capacity == 5
    assert w.sum() == pytest.approx(last.sum()) and w.mean() == pytest.approx(last.mean())
    assert w.minimum() == last[0] and w.percentile(100) == last[-1] and w.percentile(50) == last[2]
    assert w.share_at_least(last[3]) == pytest.approx(0.4)
    w.clear()
    assert len(w) == 0 and w.sum() == 0.0
    with pytest.raises(ValueError):
        Window(0)


def test_ring_is_a_bounded_fifo():
    r = Ring(3)
    item = object()
    before = sys.getrefcount(item)
    assert r.push(item) and r.push("b") and r.push("c") and not r.push("d") and r.full
    assert sys.getrefcount(item) == before + 1
    assert r.peek() is item and r.pop() is item and [r.pop(), r.pop()] == ["b", "c"]
    assert sys.getrefcount(item) == before and len(r) == 0
    with pytest.raises(IndexError):
        r.pop()
    for i in range(10):  # wraps around
        r.push(i)
        if len(r) == 3:
            r.pop()
    assert [r.pop(), r.pop()] == [8, 9]


def test_ring_batches_keep_order_and_references():
    r = Ring(4)
    items = [object() for _ in range(6)]
    counts = [sys.getrefcount(x) for x in items]
    assert r.push_many(items) == 4 and r.full  # takes what fits, in order
    assert r.pop_many(3) == items[:3]
    assert r.push_many(iter(items[4:])) == 2  # any iterable; wraps around
    assert r.pop_many(10) == [items[3], items[4], items[5]] and len(r) == 0
    assert [sys.getrefcount(x) for x in items] == counts  # nothing leaked or freed early
