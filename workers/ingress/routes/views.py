"""GET /v1/views/{view}/{key}: one row of a materialized view, read in a read-only LMDB snapshot
(the view builder is the one writer; see core/events/views.py). Rows belong to the tenant whose
events made them: a caller reads its own tenant's rows only (there is no cross-tenant read over
HTTP; an operator reads any partition with `tidegate admin log tail`)."""
from __future__ import annotations

from tidegate.core.http.http11 import HttpError, json_response
from tidegate.workers.ingress.guard import caller


class ViewRoutes:
    def __init__(self, reader):
        self.views = reader

    def add_to(self, router, guard) -> None:
        router.add("GET", "/v1/views/{view}/{key}", guard(self.view))

    def view(self, req):
        name, key = req.params["view"], req.params["key"]
        if name not in self.views.views:
            raise HttpError(404, f"no view named {name!r} (declared: {', '.join(self.views.views) or 'none'})",
                            "view_not_found", param="view")
        tenant = caller(req).tenant
        value = self.views.get(name, tenant, key)
        if value is None:
            raise HttpError(404, f"view {name!r} has nothing for key {key!r}", "key_not_found", param="key")
        return json_response({"view": name, "key": key, "kind": self.views.views[name]["kind"], "value": value})
