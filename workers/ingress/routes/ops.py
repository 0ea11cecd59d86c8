"""Operational routes: /healthz (this process is alive), /readyz and /metrics (answered by the
supervisor, which sees every worker), and POST /v1/echo (a JSON round trip through the guard)."""
from __future__ import annotations

import asyncio

from tidegate.core.http.http11 import HttpError, Response, json_response, service_unavailable
from tidegate.core.http.jsonbody import parse_json
from tidegate.core.messaging import protocol
from tidegate.core.state.ring import hash64
from tidegate.ext.tokenbucket import BucketTable

_HEALTHZ = Response(200, b'{"status":"ok"}')
_PROM_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class Shared:
    """One ask in flight at a time, its answer kept for `ttl` seconds: however many clients ask
    at once, the supervisor is asked once (a /metrics flood had saturated it, and /readyz, queued
    behind, answered 503: a load balancer would have dropped a healthy node)."""

    def __init__(self, ask, ttl: float):
        self.ask, self.ttl = ask, ttl
        self.value, self.at, self.pending = None, 0.0, None

    async def get(self):
        loop = asyncio.get_running_loop()
        if self.value is not None and loop.time() - self.at < self.ttl:
            return self.value
        if self.pending is None:
            self.pending = asyncio.ensure_future(self._fetch(loop))
        return await asyncio.shield(self.pending)

    async def _fetch(self, loop):
        try:
            self.value = await self.ask()
            self.at = loop.time()
            return self.value
        finally:
            self.pending = None


class OpsRoutes:
    def __init__(self, cfg: dict, link, snapshot):
        self.limits, self.link, self.snapshot = cfg["limits"], link, snapshot
        self.auth = cfg["server"]["metrics_auth"]
        self._readiness = Shared(lambda: self._ask(protocol.READINESS), 0.0)  # (coalesced, never stale)
        self._metrics = Shared(lambda: self._ask(protocol.METRICS, snap=self.snapshot()),
                               cfg["server"]["metrics_interval"])
        # per client address: a flood of scrapes is answered with a small 429, not the whole text
        self.scrape_rate = cfg["server"]["metrics_rps_per_address"]
        self.scrapers = BucketTable(4096, 60.0)

    def add_to(self, router, guard) -> None:
        router.add("GET", "/healthz", lambda req: _HEALTHZ)
        router.add("GET", "/readyz", self.readyz)
        router.add("GET", "/metrics", guard(self.metrics) if self.auth else self.metrics)
        router.add("POST", "/v1/echo", guard(self.echo))

    def echo(self, req) -> Response:
        """Parse a JSON body under the configured limits and send it back: a connectivity probe."""
        return json_response({"object": "echo", "data": parse_json(req, self.limits)})

    async def readyz(self, req) -> Response:
        ans = await self._readiness.get()
        return json_response(ans["body"], 200 if ans["body"]["ready"] else 503)

    async def metrics(self, req) -> Response:
        if self.scrape_rate:
            left = self.scrapers.take(hash64(req.peer.encode()), 1.0, 2 * self.scrape_rate, self.scrape_rate)
            if left < 0:
                # held back a second first (as nginx's limit_req delays): a client reusing its
                # connection asks again no sooner, so a flood costs one refusal a second per
                # connection instead of a busy loop of them
                await asyncio.sleep(1.0)
                raise HttpError(429, "too many /metrics requests from this address (server.metrics_rps_per_address)",
                                "rate_limit_exceeded", headers=[(b"retry-after", b"1")])
        ans = await self._metrics.get()
        return Response(200, ans["body"].encode(), _PROM_TYPE)

    async def _ask(self, op: str, **fields) -> dict:
        try:
            return await self.link.request(op, timeout=2.0, **fields)
        except asyncio.TimeoutError:
            raise service_unavailable("supervisor did not answer in time", "supervisor_timeout") from None
