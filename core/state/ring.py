"""Consistent-hash ring: which ingress worker owns a key.

Each node (worker slot) is placed at `vnodes` points on a 64-bit circle; a key belongs to the
first point at or after its own hash, wrapping around. With 512 virtual nodes per worker the
busiest worker holds within ~10% of the mean (bench/ring_balance.py prints the max/mean
over 1M keys), and adding or removing one of N workers moves only about 1/N of the keys, all of
them to or from that worker. Hashes are BLAKE2b-64: stable across processes and Python runs
(unlike hash()), so every worker computes the same owner.
"""
from __future__ import annotations

from bisect import bisect_left
from hashlib import blake2b


def hash64(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


class HashRing:
    def __init__(self, nodes, vnodes: int = 512):
        self.vnodes = vnodes
        self.nodes = sorted(set(nodes))
        if not self.nodes:
            raise ValueError("a ring needs at least one node")
        points = sorted((hash64(f"{node}#{i}".encode()), node) for node in self.nodes for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [n for _, n in points]

    def owner(self, key: bytes | str):
        """The node that owns key."""
        if isinstance(key, str):
            key = key.encode()
        i = bisect_left(self._hashes, hash64(key))
        return self._owners[i if i < len(self._owners) else 0]

    def with_nodes(self, nodes) -> "HashRing":
        return HashRing(nodes, self.vnodes)
