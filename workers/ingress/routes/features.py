"""GET /v1/features/{view}/{entity}: one entity's row of a feature view, as JSON, for the
caller's tenant only: from the registry (a read-only LMDB snapshot, core/features/registry.py)
or, for a view with source = redis, from Redis within the standard class's deadline (lookups that
arrive together are micro-batched into one MGET)."""
from __future__ import annotations

import asyncio

from tidegate.core.features.sources import Down, Late
from tidegate.core.http.http11 import HttpError, json_response, service_unavailable
from tidegate.core.predict.microbatch import MicroBatcher
from tidegate.workers.ingress.guard import caller


class FeatureRoutes:
    def __init__(self, hydrator, pcfg: dict):
        self.hydrator = hydrator
        self.registry = hydrator.registry
        self.batcher = None  # Redis lookups arriving together share one MGET, like predictions
        if hydrator.remote is not None:
            self.batcher = MicroBatcher(asyncio.get_running_loop(), self._fetch, pcfg["max_batch"], pcfg["max_delay"])

    def _fetch(self, wants: list):
        return self.hydrator.remote.fetch(wants, self.hydrator.deadlines["standard"])

    def add_to(self, router, guard) -> None:
        router.add("GET", "/v1/features/{view}/{entity}", guard(self.get))

    def get(self, req):
        view, entity = req.params["view"], req.params["entity"]
        v = self.registry.views.get(view)
        if v is None:
            raise HttpError(404, f"no feature view named {view!r} (declared: "
                            f"{', '.join(self.registry.views) or 'none'})", "view_not_found", param="view")
        tenant = caller(req).tenant
        if v.source == "redis":
            return self._remote(v, tenant, entity)
        found = self.registry.get(view, tenant, entity)
        if found is None:
            raise _not_found(view, entity)
        features, version = found
        return json_response({"object": "features", "view": view, "entity": entity, "version": version,
                              "features": features})

    async def _remote(self, v, tenant: str, entity: str):
        try:
            raw = await self.batcher.submit((v.name, tenant, entity))
        except Late:
            raise HttpError(504, f"the remote store did not answer for view {v.name!r} in time",
                            "source_timeout") from None
        except Down:
            raise service_unavailable(f"the remote store of view {v.name!r} is unavailable", "source_unavailable") \
                from None
        if raw is None or len(raw) != v.dtype.itemsize:
            raise _not_found(v.name, entity)
        return json_response({"object": "features", "view": v.name, "entity": entity, "version": None,
                              "features": v.unpack(raw)})


def _not_found(view: str, entity: str) -> HttpError:
    return HttpError(404, f"feature view {view!r} has no row for {entity!r}", "entity_not_found", param="entity")
