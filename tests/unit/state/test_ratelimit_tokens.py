"""LLM tokens/minute: reservations are exact under concurrency, settling refunds the unused part,
locally and across the mesh."""
import asyncio

from tidegate.core.base import config
from tidegate.core.state.auth import Identity
from helpers.owners import owner_pair
from tidegate.core.state.owners import Owners
from tidegate.core.state.ratelimit import RateLimiter, Refusal, Reservation
from tidegate.workers.ingress.guard import refusal_error
from tidegate.core.state.ring import HashRing

IDENT = Identity("k1", "alpha", "acme", "standard")


def cfg(**rl):
    return config.validate({"ratelimit": {"key_tpm": 1000.0, **rl}})


def test_local_reservations_cannot_overshoot_and_settle_refunds():
    rl = RateLimiter(cfg(), Owners(0, HashRing([0])))
    a, b = rl.reserve(IDENT, 400), rl.reserve(IDENT, 400)
    assert isinstance(a, Reservation) and isinstance(b, Reservation)
    refused = rl.reserve(IDENT, 400)  # 1,000/min: a third 400 would overshoot
    assert isinstance(refused, Refusal) and refused.status == 429 and refused.limit == 1000
    assert dict(refusal_error(refused).headers)[b"ratelimit-limit"] == b"1000"  # what the client sees
    rl.settle(a, used=100)  # 300 come back
    rl.settle(b, used=400)  # nothing comes back
    assert isinstance(rl.reserve(IDENT, 400), Reservation)
    assert isinstance(rl.reserve(IDENT, 400), Refusal)


def test_reservations_at_a_remote_owner(tmp_path):
    async def main():
        owner = HashRing(range(2)).owner(b"tenant:acme")
        asker = 1 - owner
        c = cfg()
        limiters, meshes = owner_pair(tmp_path, lambda owners: RateLimiter(c, owners))
        await asyncio.sleep(0.1)
        rl = limiters[asker]
        results = await asyncio.gather(*(rl.reserve(IDENT, 300) for _ in range(5)))
        granted = [r for r in results if isinstance(r, Reservation)]
        refused = [r for r in results if isinstance(r, Refusal)]
        assert len(granted) == 3 and len(refused) == 2  # 3 x 300 <= 1,000 < 4 x 300, concurrently
        for r in granted:
            rl.settle(r, used=0)
        await asyncio.sleep(0.1)  # the refunds travel to the owner
        assert all(isinstance(r, Reservation) for r in await asyncio.gather(*(rl.reserve(IDENT, 300)
                                                                              for _ in range(3))))
        for m in meshes.values():
            m.close()

    asyncio.new_event_loop().run_until_complete(main())


def test_a_tenant_that_fills_its_share_of_the_bucket_table_is_the_one_refused():
    """One tenant minting users filled the one bucket table: every other tenant's new
    identities were refused (Retry-After 3600). Now each tenant has its share at the owner."""
    from tidegate.core.base import config
    from tidegate.core.state.auth import Identity
    from tidegate.core.state.owners import Owners
    from tidegate.core.state.ratelimit import RateLimiter
    from tidegate.core.state.ring import HashRing
    cfg = config.load(None, {"ratelimit.user_rps": 1.0, "ratelimit.table_capacity": 128,
                             "ratelimit.tenant_share": 0.5, "ratelimit.idle_ttl": 3600.0})
    rl = RateLimiter(cfg, Owners(0, HashRing([0])))
    answers = [rl.admit(Identity("k1", "k1", "mallory", "", f"u{i}")) for i in range(200)]
    assert answers[:64] == [None] * 64  # its share: 64 users' buckets
    assert all(a is not None and a.status == 429 and a.retry_after == 3600 for a in answers[64:])
    assert all(rl.admit(Identity("k2", "k2", "victim", "", f"v{i}")) is None for i in range(60))  # untouched
