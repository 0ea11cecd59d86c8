"""GET /v1/features/{view}/{entity}: one entity's row of a feature view, as JSON, for the
caller's tenant only, read in a read-only LMDB snapshot (core/features/registry.py)."""
from __future__ import annotations

from tidegate.core.http.http11 import HttpError, json_response
from tidegate.core.http.router import path_params
from tidegate.workers.ingress.guard import caller


class FeatureRoutes:
    def __init__(self, registry):
        self.registry = registry

    def add_to(self, router, guard) -> None:
        get = guard(self.get)
        router.add("GET", "/v1/features/{view}/{entity}", lambda req, **_: get(req))

    def get(self, req):
        view, entity = path_params(req, 3)
        if view not in self.registry.views:
            raise HttpError(404, f"no feature view named {view!r} (declared: "
                            f"{', '.join(self.registry.views) or 'none'})", "view_not_found", param="view")
        tenant = caller(req).tenant
        found = self.registry.get(view, tenant, entity)
        if found is None:
            raise HttpError(404, f"feature view {view!r} has no row for {entity!r}", "entity_not_found", param="entity")
        features, version = found
        return json_response({"object": "features", "view": view, "entity": entity, "version": version,
                              "features": features})
