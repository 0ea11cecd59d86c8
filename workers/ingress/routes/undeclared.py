"""The routes of a feature that is not configured: a request naming a model, feature view or
event view answers 404 naming it (as when others are declared), never "no route"."""
from __future__ import annotations

from tidegate.core.http.http11 import HttpError


def not_declared(what: str, name: str, code: str, param: str) -> HttpError:
    return HttpError(404, f"no {what} named {name!r} (declared: none)", code, param=param)


class UndeclaredRoutes:
    def __init__(self, predict: bool, features: bool, views: bool):
        self.predict, self.features, self.views = predict, features, views

    def add_to(self, router, guard) -> None:
        if self.predict:
            for method, path in (("POST", "/v1/predict/{model}"), ("GET", "/v1/predict/{model}"),
                                 ("POST", "/v1/predict/{model}/batch")):
                router.add(method, path, guard(self.model))
        if self.features:
            router.add("GET", "/v1/features/{view}/{entity}", guard(self.feature_view))
        if self.views:
            router.add("GET", "/v1/views/{view}/{key}", guard(self.view))

    def model(self, req):
        raise not_declared("model", req.params["model"], "model_not_found", "model")

    def feature_view(self, req):
        raise not_declared("feature view", req.params["view"], "view_not_found", "view")

    def view(self, req):
        raise not_declared("view", req.params["view"], "view_not_found", "view")
