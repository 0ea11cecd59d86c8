"""Redis/Valkey as a remote online store: the `redis` feature-view source.

A row of view V for (tenant, entity) is one Redis string at PREFIX V:LEN(tenant):tenant:entity
(the tenant's length makes the key unambiguous, so tenant "a:b" can never read tenant "a"'s
entity "b:…"), holding the same packed record as the registry (View.pack: float32/int64 in the
view's order), so a read is bytes to a vector with no parsing. Rows expire with Redis's own
expiry (the view's ttl, set by `tidegate features load`). Ingress workers read with redis-py's
asyncio client (hiredis parsing): the hydration of one micro-batch is one MGET, one round trip.

Each worker keeps one Breaker for the store ([breakers]): missed deadlines and errors open it, and while open
hydration takes the defaults at once (`down`) instead of waiting. A read that misses its
deadline is not cancelled (cancelling mid-reply would cost the connection); it finishes in the
background, bounded by the pool size, and its outcome still teaches the breaker.
"""
from __future__ import annotations

import asyncio

from tidegate.core.base.breaker import Breaker


def redis_key(prefix: str, view: str, tenant: str, entity: str) -> bytes:
    return f"{prefix}{view}:{len(tenant)}:{tenant}:{entity}".encode()


class Late(Exception):
    """The source did not answer within the deadline."""


class Down(Exception):
    """The source is unreachable, failing, or its breaker is open."""


class RedisSource:
    def __init__(self, fcfg: dict, views: dict, bcfg: dict):
        import redis.asyncio as aioredis  # only workers that hydrate from redis pay for the import
        self.views, self.prefix = views, fcfg["redis_prefix"]
        self.pool_size = fcfg["redis_pool"]
        self.client = aioredis.Redis.from_url(fcfg["redis_url"], max_connections=self.pool_size,
                                              socket_timeout=fcfg["redis_timeout"],
                                              socket_connect_timeout=fcfg["redis_timeout"])
        self.breaker = Breaker.from_config(bcfg)
        self.inflight = 0
        self.stats = {"redis_reads": 0, "redis_late": 0, "redis_errors": 0}

    def counters(self) -> dict:
        return dict(self.stats, redis_breaker_opened=self.breaker.stats["opened"])

    def fetch(self, wants: list[tuple[str, str, str]], deadline: float) -> asyncio.Future:
        """A future of [packed row bytes or None] for wants [(view, tenant, entity)], read in one
        MGET; it fails with Late after deadline seconds, with Down when the store fails or its
        breaker is open. Callbacks and a timer, not a waiting Task: this runs per micro-batch."""
        loop = asyncio.get_running_loop()
        out = loop.create_future()
        if self.inflight >= self.pool_size or not self.breaker.allow():
            out.set_exception(Down())
            return out
        prefix = self.prefix
        self.inflight += 1
        task = asyncio.ensure_future(self.client.mget([redis_key(prefix, v, t, e) for v, t, e in wants]))

        def late() -> None:
            if not out.done():
                self.stats["redis_late"] += 1
                task.late = True  # a failure now; its outcome, when it comes, no longer counts
                self.breaker.failure()
                out.set_exception(Late())

        timer = loop.call_later(deadline, late)

        def settled(t: asyncio.Task) -> None:
            timer.cancel()
            self._settled(t)
            if not out.done():
                if t.cancelled() or t.exception() is not None:
                    out.set_exception(Down())
                else:
                    self.stats["redis_reads"] += len(wants)
                    out.set_result(t.result())
        task.add_done_callback(settled)
        return out

    async def warm(self, n: int = 4) -> None:
        """Open a few pooled connections before traffic, so the first requests within a 2 ms
        deadline do not pay the connect (a failure here only leaves the pool cold)."""
        try:
            await asyncio.gather(*(self.client.ping() for _ in range(min(n, self.pool_size))))
        except Exception:
            pass

    def _settled(self, task: asyncio.Task) -> None:
        self.inflight -= 1
        failed = task.cancelled() or task.exception() is not None
        if failed:
            self.stats["redis_errors"] += 1
        if getattr(task, "late", False):
            return  # already counted as a failure when its deadline passed
        if failed:
            self.breaker.failure()
        else:
            self.breaker.success()

    async def close(self) -> None:
        await self.client.aclose()
