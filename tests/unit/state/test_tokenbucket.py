"""The Cython token-bucket table: refill, denial with wait time, refunds, bounded memory."""
import math
import random

from tidegate.core.state.ring import hash64
from tidegate.ext.tokenbucket import FULL, BucketTable


def test_take_until_empty_then_refill():
    t = BucketTable(capacity=100)
    k = hash64(b"key-1")
    now = 1000.0
    for i in range(10):
        assert t.take(k, 1, 10, 5, now) == 9 - i
    wait = t.take(k, 1, 10, 5, now)
    assert wait < 0 and math.isclose(-wait, 0.2)  # 1 token at 5/s
    assert math.isclose(t.take(k, 1, 10, 5, now + 0.2), 0, abs_tol=1e-9)
    assert t.take(k, 3, 10, 5, now + 10) == 7  # refilled to capacity, not beyond
    assert t.take(k, 11, 10, 5, now + 10) == -math.inf  # can never fit
    assert len(t) == 1


def test_refund_caps_at_capacity():
    t = BucketTable(capacity=10)
    k = hash64(b"k")
    assert t.take(k, 8, 10, 1, 50.0) == 2
    assert t.refund(k, 5) == 7
    assert t.refund(k, 100) == 10
    assert t.refund(hash64(b"other"), 1) == -1


def test_buckets_are_independent_and_zero_key_is_usable():
    t = BucketTable(capacity=1000)
    keys = [hash64(f"id{i}".encode()) for i in range(500)] + [0]
    for k in keys:
        assert t.take(k, 1, 2, 1, 7.0) == 1
    for k in keys:
        assert t.take(k, 1, 2, 1, 7.0) == 0
        assert t.take(k, 1, 2, 1, 7.0) < 0
    assert len(t) == 501


def test_full_table_reclaims_idle_buckets_and_otherwise_fails_closed():
    t = BucketTable(capacity=64, idle_ttl=30.0)
    for i in range(64):
        assert t.take(hash64(b"%d" % i), 1, 5, 1, 100.0) == 4
    assert t.take(hash64(b"new"), 1, 5, 1, 100.0) == FULL  # all active: deny the newcomer
    assert t.rejected_full == 1 and len(t) == 64
    # 30 s later they have refilled and are idle: room is made on demand
    assert t.take(hash64(b"new"), 1, 5, 1, 131.0) == 4
    assert t.reclaimed == 64 and len(t) == 1


def test_deletion_keeps_every_remaining_key_reachable():
    rnd = random.Random(7)
    t = BucketTable(capacity=2000, idle_ttl=10.0)
    keys = [rnd.getrandbits(64) | 1 for _ in range(1500)]
    for i, k in enumerate(keys):
        t.take(k, 1, 4, 1, 0.0 if i % 2 else 100.0)  # odd keys go idle early
    assert t.reclaim(now=105.0) == 750
    for i, k in enumerate(keys):
        lvl = t.level(k, now=105.0)
        assert (lvl == -1) if i % 2 else lvl >= 3, (i, lvl)


def test_take_batch_matches_take():
    from array import array
    keys = [hash64(b"%d" % (i % 7)) for i in range(50)]
    a, b = BucketTable(capacity=100), BucketTable(capacity=100)
    out = array("d", [0.0] * 50)
    a.take_batch(array("Q", keys), array("d", [1.0] * 50), array("d", [5.0] * 50), array("d", [0.0] * 50), out)
    expected = [b.take(k, 1.0, 5.0, 0.0) for k in keys]
    assert list(out) == expected
    assert sum(1 for x in out if x >= 0) == 7 * 5  # 5 tokens per identity, no refill


def test_wait_time_takes_nothing():
    t = BucketTable(capacity=10)
    k = hash64(b"w")
    assert t.wait_time(k, 3, 10, 2, 0.0) == 0  # no bucket yet: starts full
    t.take(k, 10, 10, 2, 0.0)
    assert math.isclose(t.wait_time(k, 3, 10, 2, 0.0), 1.5)
    assert math.isclose(t.wait_time(k, 3, 10, 2, 0.0), 1.5)  # still: nothing was taken
    assert t.wait_time(k, 11, 10, 2, 0.0) == math.inf


def test_take_list_matches_take():
    keys = [hash64(b"%d" % (i % 3)) for i in range(12)]
    a, b = BucketTable(capacity=10), BucketTable(capacity=10)
    got = a.take_list([[k, 1.0, 3.0, 0.0] for k in keys])
    assert got == [b.take(k, 1.0, 3.0, 0.0) for k in keys]
    assert sum(x >= 0 for x in got) == 9
