"""The consistent-hash ring: stable owners, even spread, minimal movement."""
import collections

from tidegate.core.state.ring import HashRing, hash64

KEYS = [f"user-{i}".encode() for i in range(60000)]


def test_owner_is_stable_and_deterministic():
    a, b = HashRing(range(4)), HashRing([3, 2, 1, 0])
    assert all(a.owner(k) == b.owner(k) for k in KEYS[:2000])
    assert a.owner("user-1") == a.owner(b"user-1")
    assert hash64(b"x") == hash64(b"x") != hash64(b"y")


def test_keys_spread_evenly():
    ring = HashRing(range(8))
    load = collections.Counter(ring.owner(k) for k in KEYS)
    mean = len(KEYS) / 8
    assert set(load) == set(range(8))
    assert max(load.values()) / mean < 1.15 and min(load.values()) / mean > 0.85, load


def test_adding_a_node_moves_about_one_nth_and_only_to_it():
    old, new = HashRing(range(4)), HashRing(range(5))
    moved = [k for k in KEYS if old.owner(k) != new.owner(k)]
    assert all(new.owner(k) == 4 for k in moved)
    assert 0.15 < len(moved) / len(KEYS) < 0.25  # ideal 1/5


def test_removing_a_node_moves_only_its_keys():
    old, new = HashRing(range(5)), HashRing([0, 1, 2, 4])
    moved = [k for k in KEYS if old.owner(k) != new.owner(k)]
    assert all(old.owner(k) == 3 for k in moved)
    assert 0.15 < len(moved) / len(KEYS) < 0.25
