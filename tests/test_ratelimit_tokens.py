"""LLM tokens/minute: reservations are exact under concurrency, settling refunds the unused part,
locally and across the mesh."""
import asyncio

import pytest

from tidegate.core import config
from tidegate.core.auth import Identity
from tidegate.core.http11 import HttpError
from tidegate.core.mesh import Mesh
from tidegate.core.ratelimit import RateLimiter
from tidegate.core.ring import HashRing

IDENT = Identity("k1", "alpha", "acme", "standard")


def limiter(slot=0, n=1, **rl):
    cfg = config.validate({"ratelimit": {"key_tpm": 1000.0, **rl}})
    return RateLimiter(cfg, slot, HashRing(range(n)))


def test_local_reservations_cannot_overshoot_and_settle_refunds():
    rl = limiter()
    a, b = rl.reserve(IDENT, 400), rl.reserve(IDENT, 400)
    with pytest.raises(HttpError) as e:
        rl.reserve(IDENT, 400)  # 1,000/min: a third 400 would overshoot
    assert e.value.status == 429 and dict(e.value.headers)[b"ratelimit-limit"] == b"1000"
    rl.settle(a, used=100)  # 300 come back
    rl.settle(b, used=400)  # nothing comes back
    rl.reserve(IDENT, 400)
    with pytest.raises(HttpError):
        rl.reserve(IDENT, 400)


def test_reservations_at_a_remote_owner(tmp_path):
    async def main():
        ring = HashRing(range(2))
        owner = ring.owner(b"tenant:acme")
        asker = 1 - owner
        limiters = {s: limiter(s, 2) for s in (0, 1)}
        meshes = {s: Mesh(s, 2, str(tmp_path), limiters[s].handlers(), 1 << 20) for s in (0, 1)}
        for s in (0, 1):
            limiters[s].mesh = meshes[s]
            meshes[s].start()
        await asyncio.sleep(0.1)
        rl = limiters[asker]
        results = await asyncio.gather(*(rl.reserve(IDENT, 300) for _ in range(5)), return_exceptions=True)
        granted = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, HttpError)]
        assert len(granted) == 3 and len(refused) == 2  # 3 x 300 <= 1,000 < 4 x 300, concurrently
        for r in granted:
            rl.settle(r, used=0)
        await asyncio.sleep(0.1)  # the refunds travel to the owner
        assert len([r for r in await asyncio.gather(*(rl.reserve(IDENT, 300) for _ in range(3)),
                                                    return_exceptions=True) if not isinstance(r, Exception)]) == 3
        for m in meshes.values():
            m.close()

    asyncio.new_event_loop().run_until_complete(main())
