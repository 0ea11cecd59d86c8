"""Owner calls over the actor mesh on real ZeroMQ ipc sockets: batching, deadlines, local calls
(core/state/owners.py decides local call or hop; core/messaging/mesh.py carries the hop)."""
import asyncio
import time

import pytest

from tidegate.core.messaging.mesh import Mesh, OwnerUnavailable, RemoteError
from tidegate.core.state.owners import Owners
from tidegate.core.state.ring import HashRing


def make_meshes(tmp_path, n, handlers_for):
    """[(Owners, Mesh)] for n workers on one ring."""
    ring, out = HashRing(range(n)), []
    for i in range(n):
        owners = Owners(i, ring)
        owners.register(handlers_for(i))
        mesh = Mesh(i, n, str(tmp_path), owners.handlers, 1 << 20)
        owners.attach(mesh)
        out.append((owners, mesh))
    return out


async def call(owners, where, op, payload, timeout=0.5):
    result = owners.call(where, op, payload, timeout)
    return await result if asyncio.isfuture(result) else result


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_calls_reach_the_owner_batched_in_one_frame(tmp_path):
    state = {0: {}, 1: {}}

    def handlers(i):
        def incr(p):
            state[i][p["key"]] = state[i].get(p["key"], 0) + p["n"]
            return {"owner": i, "value": state[i][p["key"]]}
        return {"incr": incr, "boom": lambda p: 1 / 0}

    async def main():
        (oa, a), (_, b) = make_meshes(tmp_path, 2, handlers)
        a.start(), b.start()
        await asyncio.sleep(0.1)  # let the DEALERs connect
        ring = HashRing(range(2))
        keys = [f"k{i}" for i in range(200)]
        results = await asyncio.gather(*(call(oa, ring.owner(k), "incr", {"key": k, "n": 1}) for k in keys))
        for k, r in zip(keys, results):
            assert r == {"owner": ring.owner(k), "value": 1}
        remote = sum(1 for k in keys if ring.owner(k) == 1)
        assert a.stats["messages_out"] == remote and a.stats["frames_out"] == 1  # one frame for all
        # a key the asker owns is a direct call: no message
        assert await call(oa, 0, "incr", {"key": "mine", "n": 5}) == {"owner": 0, "value": 5}
        assert a.stats["messages_out"] == remote
        with pytest.raises(RemoteError, match="ZeroDivisionError"):
            await call(oa, 1, "boom", {})
        a.close(), b.close()

    run(main())


def test_dead_owner_times_out_quickly_and_expired_work_is_skipped(tmp_path):
    calls = []

    async def main():
        (oa, a), (_, b) = make_meshes(tmp_path, 2, lambda i: {"rec": lambda p: calls.append(p) or "ok"})
        a.start()  # b never reads: it plays a dead or stalled owner
        await asyncio.sleep(0.05)
        t = time.monotonic()
        with pytest.raises(OwnerUnavailable, match="worker 1"):
            await call(oa, 1, "rec", "late", timeout=0.2)
        assert time.monotonic() - t < 0.5
        b.start()  # now it reads the stale request: its deadline has passed
        await asyncio.sleep(0.2)
        assert calls == [] and b.stats["expired"] == 1 and oa.stats["owner_unavailable"] == 1
        assert await call(oa, 1, "rec", "fresh") == "ok"
        a.close(), b.close()

    run(main())


def test_calls_for_a_store_being_handed_over_wait_then_run(tmp_path):
    async def main():
        owners = Owners(0, HashRing([0]))
        owners.hold(["put"])
        early = owners.call(0, "put", 1, 0.5)  # the store is not open yet: the call waits
        await asyncio.sleep(0.05)
        assert not early.done()
        owners.open({"put": lambda p: p * 10})
        assert await early == 10 and owners.call(0, "put", 2, 0.5) == 20
        owners.hold(["put"])  # released again: calls wait, and fail once the hold times out
        owners.HOLD_S = 0.05
        with pytest.raises(OwnerUnavailable):
            await owners.call(0, "put", 3, 0.5)

    run(main())
