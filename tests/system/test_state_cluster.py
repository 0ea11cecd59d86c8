"""state.backend = "cluster": sessions, rate limits and exact-cache entries in a real Redis
Cluster (3 masters + 3 replicas on loopback), shared by two tidegate nodes, through a master's
death and the failover that follows."""
import asyncio
import json
import math
import threading
import time

import pytest

from helpers.http import request
from helpers.keys import ALPHA, BETA, KEYS
from helpers.redis_cluster import RedisCluster
from tidegate.core.base import config
from tidegate.core.messaging.mesh import OwnerUnavailable
from tidegate.core.messaging.protocol import (RL_LEASE, RL_REFUND, RL_TAKE, SESS_CREATE, SESS_DELETE, SESS_GET,
                                              SESS_PATCH, XC_GET, XC_PUT, XC_STALE)
from tidegate.core.state.cluster import ClusterOwners, key_tag
from tidegate.core.state.sessions import TOO_LARGE
from tidegate.ext.tokenbucket import BucketTable


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = RedisCluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


def state_cfg(cluster, **over):
    sections = {"state": {"backend": "cluster", "seeds": cluster.seeds, **over.pop("state", {})}, **over}
    return config.load(None, {f"{sec}.{k}": v for sec, keys in sections.items() for k, v in keys.items()})


def run(coro):
    return asyncio.run(coro)


async def owners_for(cluster, **over):
    o = ClusterOwners(state_cfg(cluster, **over))
    assert await o.start(10.0)
    return o


def test_buckets_in_the_cluster_decide_as_the_local_table_does(cluster):
    async def go():
        o = await owners_for(cluster)
        owner = o.owner_of(b"tenant:acme")
        checks = [[11, 1.0, 5.0, 0.001], [12, 1.0, 3.0, 0.001]]  # (all but no refill within the test)
        local = BucketTable(64, 60.0)
        got = [await o.call(owner, RL_TAKE, checks, 1.0) for _ in range(5)]
        want = [local.take_list([list(c) for c in checks]) for _ in range(5)]
        for g, w in zip(got, want):  # same answers, up to the refill of the time between calls
            assert [r >= 0 for r in g] == [r >= 0 for r in w]
            assert all(abs(a - b) < 0.05 for a, b in zip(g, w) if a >= 0)
        assert got[3][1] < 0 and got[3][0] >= 0  # the smaller bucket refuses first
        assert (await o.call(owner, RL_TAKE, [[13, 10.0, 5.0, 1.0]], 1.0)) == [-math.inf]  # more than it holds
        await o.call(owner, RL_REFUND, [[11, 2.0]], 1.0)  # give back two (capped at capacity)
        assert (await o.call(owner, RL_TAKE, [[11, 1.0, 5.0, 0.001]], 1.0))[0] == pytest.approx(1.0, abs=0.05)
        # a lease: at most 1/(2 peers) of what is left, from every bucket of the check
        res, granted = await o.call(owner, RL_LEASE, [[[21, 1.0, 1000.0, 0.001]], 50], 1.0)
        assert res[0] == pytest.approx(999.0, abs=0.1) and granted == min(50, int(999 / (2 * o.peers)))
        res = await o.call(owner, RL_TAKE, [[21, 0.0, 1000.0, 0.001]], 1.0)
        assert res[0] == pytest.approx(999.0 - granted, abs=0.1)  # the lease came out of the bucket
        await o.close()
    run(go())


def test_sessions_and_exact_entries_in_the_cluster(cluster):
    async def go():
        o = await owners_for(cluster, sessions={"ttl": 30.0, "max_attributes_bytes": 64},
                             cache={"exact_ttl": 0.3, "exact_stale_ttl": 5.0})
        sid = "ab" * 32
        owner = o.owner_of(sid.encode())
        rec = await o.call(owner, SESS_CREATE, {"sid": sid, "tenant": "acme", "user": "u1", "key_id": "k1",
                                                "class": "standard", "attributes": {"plan": "pro", "n": [1]}}, 1.0)
        assert rec["tenant"] == "acme" and rec["expires_at"] > time.time() + 29
        got = await o.call(owner, SESS_GET, sid, 1.0)
        assert got["attributes"] == {"plan": "pro", "n": [1]} and got["last_seen"] >= rec["last_seen"]
        p = await o.call(owner, SESS_PATCH, {"sid": sid, "attributes": {"plan": None, "lang": "fr"}}, 1.0)
        assert p["attributes"] == {"n": [1], "lang": "fr"}
        assert await o.call(owner, SESS_PATCH, {"sid": sid, "attributes": {"x": "y" * 100}}, 1.0) == TOO_LARGE
        # concurrent patches merge (compare-and-set): none is lost
        await asyncio.gather(*[o.call(owner, SESS_PATCH, {"sid": sid, "attributes": {f"k{i}": i}}, 2.0)
                               for i in range(4)])
        assert {f"k{i}" for i in range(4)} <= set((await o.call(owner, SESS_GET, sid, 1.0))["attributes"])
        ttl = cluster.client(cluster.master_of(f"tg:s:{{{owner}}}")).pttl(f"tg:s:{{{owner}}}")
        assert 25_000 < ttl <= 30_000  # the session's expiry is the key's
        assert await o.call(owner, SESS_DELETE, sid, 1.0) is True
        assert await o.call(owner, SESS_GET, sid, 1.0) is None
        # exact cache: live, then stale only, then gone
        key = "acme|m|abc"
        xo = o.owner_of(key.encode())
        await o.call(xo, XC_PUT, [key, "acme", {"text": "hi"}], 1.0)
        assert await o.call(xo, XC_GET, key, 1.0) == {"text": "hi"}
        await asyncio.sleep(0.4)
        assert await o.call(xo, XC_GET, key, 1.0) is None and await o.call(xo, XC_STALE, key, 1.0) == {"text": "hi"}
        others = [f"globex|m|{i}" for i in range(5)]
        for k in others:
            await o.call(o.owner_of(k.encode()), XC_PUT, [k, "globex", {"text": k}], 1.0)
        assert await o.purge("acme") == 1  # one tenant's entries only
        assert await o.call(xo, XC_STALE, key, 1.0) is None
        assert await o.call(o.owner_of(others[0].encode()), XC_GET, others[0], 1.0) == {"text": others[0]}
        assert await o.purge(None) >= 5  # every tenant's (a scan of every master)
        assert await o.call(o.owner_of(others[0].encode()), XC_GET, others[0], 1.0) is None
        await o.close()
    run(go())


def test_an_unreachable_cluster_is_owner_unavailable_not_a_hang(cluster):
    async def go():
        o = ClusterOwners(state_cfg(cluster, state={"seeds": ["127.0.0.1:1"]}))
        assert not await o.start(0.5)  # boots anyway, connecting in the background
        t0 = time.monotonic()
        with pytest.raises(OwnerUnavailable):
            await o.call(o.owner_of(b"tenant:acme"), RL_TAKE, [[1, 1.0, 5.0, 1.0]], 1.0)
        assert time.monotonic() - t0 < 0.5
        await o.close()
    run(go())


# ---- two tidegate nodes sharing the cluster ----------------------------------------------------
def api(port, method, path, token=None, body=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return request(port, method, path, None if body is None else json.dumps(body).encode(), headers=headers,
                   timeout=10.0)


def two_nodes(daemon_factory, cluster, **sections):
    sections.setdefault("auth", {"keys": KEYS})
    state = {"backend": "cluster", "seeds": cluster.seeds, "lease_peers": 4, **sections.pop("state", {})}
    nodes = [daemon_factory(workers=2, state=state, **sections) for _ in range(2)]
    for d in nodes:
        connected(d)
    return nodes


def connected(d, timeout: float = 20.0) -> None:
    """Wait until the node's workers reach the cluster: a worker boots without it (its client
    connects in the background), and on a loaded box that can take longer than the 2 s it waits.
    An unknown session token is a 401 once its lookup is answered, a 503 until then; eight 401s
    in a row (new connections, spread over the workers) and both workers are connected."""
    token = "tgs-" + "A" * 43
    deadline, row = time.monotonic() + timeout, 0
    while row < 8:
        assert time.monotonic() < deadline, f"node on {d.port} never reached the cluster"
        row = row + 1 if api(d.port, "GET", "/v1/sessions/current", token).status == 401 else 0
        if not row:
            time.sleep(0.1)


def test_two_nodes_share_one_exact_limit_and_sessions(daemon_factory, cluster):
    a, b = two_nodes(daemon_factory, cluster, ratelimit={"key_rps": 0.001, "key_burst": 40.0})
    ok = {"a": 0, "b": 0}
    statuses = []

    def hammer(name, port):
        for _ in range(60):
            r = api(port, "POST", "/v1/echo", ALPHA, {"x": 1})
            statuses.append(r.status)
            ok[name] += r.status == 200
    threads = [threading.Thread(target=hammer, args=(n, d.port)) for n, d in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 429}, sorted(statuses)
    assert ok["a"] + ok["b"] == 40 and ok["a"] > 0 and ok["b"] > 0  # one limit for both nodes, exactly
    assert api(b.port, "POST", "/v1/echo", BETA, {"x": 1}).status == 200  # another key: its own bucket
    # a session made on node A works on node B, and a patch on B is seen on A
    s = api(a.port, "POST", "/v1/sessions", BETA, {"user": "u1", "attributes": {"cart": 1}}).json()
    assert api(b.port, "GET", "/v1/sessions/current", s["token"]).json()["attributes"] == {"cart": 1}
    assert api(b.port, "PATCH", "/v1/sessions/current", s["token"], {"attributes": {"cart": 2}}).status == 200
    assert api(a.port, "GET", "/v1/sessions/current", s["token"]).json()["attributes"] == {"cart": 2}
    metrics = api(a.port, "GET", "/metrics").body.decode()
    assert "tidegate_state_cluster_calls_total" in metrics


@pytest.mark.parametrize("fail_open", [False, True])
def test_a_master_killed_mid_test(tmp_path, daemon_factory, fail_open):
    """Its own cluster (a master dies): callers get 503s (or fail-open admissions) during the
    failover, never a hang or a 500; no session write that was acknowledged is lost, though its
    master died before its replica had it (the replica was paused: writes the replica did not
    take are refused with a 503, not acknowledged); then everything works again."""
    # a 3 s node timeout: the failover takes longer than the 1 s after which limits fail open
    cluster = RedisCluster(tmp_path / "own-cluster", node_timeout_ms=3000)
    try:
        a, b = two_nodes(daemon_factory, cluster, ratelimit={"key_rps": 1000.0, "fail_open": fail_open})
        tag = "tg:rl:{" + key_tag(b"tenant:acme") + "}"
        victim = cluster.master_of(tag)
        replica = cluster.replica_of(victim)

        def create(i):
            r = api(a.port if i % 2 else b.port, "POST", "/v1/sessions", ALPHA, {"user": f"u{i}", "attributes": {"i": i}})
            assert r.status in (201, 503), r.body
            return (r.json()["token"], i) if r.status == 201 else None
        acked = [create(i) for i in range(30)]
        assert all(acked)  # (all replicated)
        cluster.pause(replica)  # the victim's writes from now on reach no replica
        late = [create(i) for i in range(30, 60)]
        cluster.kill(victim)
        cluster.resume(replica)
        assert None in late and any(late)  # some landed on the victim's slots (refused), some elsewhere
        acked += [x for x in late if x]
        t0, during = time.monotonic(), []
        while time.monotonic() - t0 < 2.5:  # before the replicas notice (cluster-node-timeout 3 s)
            r = api(a.port, "POST", "/v1/echo", ALPHA, {"x": 1})
            during.append(r.status)
            if r.status == 503:
                assert r.json()["error"]["code"] == "owner_unavailable"
        assert set(during) <= {200, 503}
        # by the window's end the cluster has failed every call for over a second (and a lease
        # lasts 50 ms): what is answered then is the configured failure mode, not a leased token
        assert during[-1] == (200 if fail_open else 503), during  # (all of it, on failure)
        cluster.wait_failover(tag, victim)
        deadline = time.monotonic() + 15
        while api(b.port, "POST", "/v1/echo", ALPHA, {"x": 1}).status != 200:
            assert time.monotonic() < deadline, "the node did not recover after the failover"
            time.sleep(0.2)
        for token, i in acked:  # nothing acknowledged was lost
            r = api(b.port, "GET", "/v1/sessions/current", token)
            assert r.status == 200 and r.json()["attributes"] == {"i": i}, (i, r.status)
    finally:
        cluster.stop()


def test_a_cluster_with_a_password_is_reached_and_admin_config_masks_every_secret(tmp_path, daemon_factory):
    """Workers had been handed the masked config and sent AUTH with '***': sessions answered
    503 and limits failed open. The workers that need a secret get it (in their spec's memfd);
    `tidegate admin config` shows none (nor a backend api_key, nor a password inside a URL)."""
    c = RedisCluster(tmp_path / "pw", password="s3cret-pw")
    try:
        d = daemon_factory(workers=2, auth={"keys": KEYS}, ratelimit={"key_rps": 0.001, "key_burst": 3.0},
                           state={"backend": "cluster", "seeds": c.seeds, "password": "s3cret-pw"},
                           features={"redis_url": "redis://user:url-secret@127.0.0.1:1/0"},
                           inference={"enabled": True, "models": [
                               {"name": "r", "backends": [{"url": "http://127.0.0.1:1", "api_key": "sk-backend-secret"}]}]})
        connected(d)
        s = api(d.port, "POST", "/v1/sessions", BETA, {"user": "u1"})
        assert s.status == 201, s.body
        assert api(d.port, "GET", "/v1/sessions/current", s.json()["token"]).status == 200
        statuses = [api(d.port, "POST", "/v1/echo", ALPHA, {"x": 1}).status for _ in range(6)]
        assert statuses.count(200) == 3 and statuses.count(429) == 3, statuses  # limited, not failing open
        shown = json.dumps(d.admin_json("config"))
        for secret in ("s3cret-pw", "url-secret", "sk-backend-secret"):
            assert secret not in shown
    finally:
        c.stop()
