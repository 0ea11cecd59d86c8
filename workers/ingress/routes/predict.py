"""POST /v1/predict/{model} and /v1/predict/{model}/batch; GET /v1/predict/{model} (what it takes).

One prediction:  {"entities": {"user": "u1", …}, "features": {"amount": 12.5, …}}
A batch:         {"instances": [<one prediction>, …]}   (up to predict.max_instances)

The request is checked against the model's inputs first (400 naming the parameter: an entity
type it needs or does not use, a request feature missing, unknown or not a finite number), then
handed to the model's Predictor (core/predict/pipeline.py): micro-batched, hydrated, scored.
A model with fallback = last_served answers a failed scoring with the entity's last answer, one
with `static = {score = …}` with that answer (each marked "fallback"). The class is the model's,
else the route's, else the caller's (core/overload/classes.py).
The answer carries the model's version, its class, every input it used and, per defaulted
input, why (missing, expired, late, down). Rows are read in the caller's tenant only.
"""
from __future__ import annotations

import asyncio
import math

from tidegate.core.features.hydrate import Instance
from tidegate.core.http.http11 import HttpError, json_response
from tidegate.core.http.jsonbody import parse_json
from tidegate.core.overload.classes import Classes
from tidegate.workers.ingress.guard import caller
from tidegate.workers.ingress.scoring import ModelError

MAX_ID_CHARS = 256


class PredictRoutes:
    def __init__(self, cfg: dict, predictors: dict, shedder=None, classes=None):
        self.limits, self.predictors, self.shedder = cfg["limits"], predictors, shedder
        self.classes = classes or Classes(cfg)
        self.max_instances = cfg["predict"]["max_instances"]

    def add_to(self, router, guard) -> None:
        router.add("POST", "/v1/predict/{model}", guard(self.predict))
        router.add("GET", "/v1/predict/{model}", guard(self.info))
        router.add("POST", "/v1/predict/{model}/batch", guard(self.predict_batch))

    def _model(self, req):
        name = req.params["model"]
        p = self.predictors.get(name)
        if p is None:
            raise HttpError(404, f"no model named {name!r} (declared: {', '.join(self.predictors) or 'none'})",
                            "model_not_found", param="model")
        return p

    def info(self, req):
        p = self._model(req)
        return json_response({"object": "model", "id": p.name, "version": p.version, "class": p.cls,
                              "inputs": p.plan.names, "entities": p.plan.entity_types,
                              "request_features": p.plan.request_names})

    def predict(self, req):
        p = self._model(req)
        body = parse_json(req, self.limits)
        who = caller(req)
        inst = _instance(p.plan, body, who.tenant, "")
        cls = self.classes.of(req.path, who.klass, p.cls)
        retry = self.shedder.check(cls, p.source) if self.shedder is not None else None
        if retry is not None:
            return self._shed(p, inst, cls, retry)
        if p.has_fallback:
            return _with_fallback(p, inst, cls)
        return _answer(p.submit(inst, cls), lambda a: a)

    async def _shed(self, p, inst, cls: str, retry: int):
        """The model's scorer is overloaded for this class: the entity's last prediction (policy
        cached, fallback = last_served), else 503 with Retry-After. Never the model."""
        sh = self.shedder
        if sh.cached(cls):
            old = await p.fallback(inst, cls)
            if old is not None:
                return json_response(old, headers=[(b"x-tidegate-cache", b"fallback"), *sh.served(cls, "fallback")])
        raise sh.reject(cls, retry, f"model {p.name!r}")

    def predict_batch(self, req):
        p = self._model(req)
        body = parse_json(req, self.limits)
        if not isinstance(body, dict) or set(body) - {"instances"}:
            bad = sorted(set(body) - {"instances"}) if isinstance(body, dict) else []
            raise HttpError(400, f"unknown parameter {bad[0]!r}" if bad else "the body must be a JSON object "
                            "{\"instances\": [...]}", "invalid_request_error", param=bad[0] if bad else None)
        items = body.get("instances")
        if not isinstance(items, list) or not items:
            raise HttpError(400, "instances must be a non-empty array", "invalid_request_error", param="instances")
        if len(items) > self.max_instances:
            raise HttpError(413, f"{len(items)} instances; at most {self.max_instances} per request "
                            "(predict.max_instances)", "too_many_instances", param="instances")
        who = caller(req)
        insts = [_instance(p.plan, item, who.tenant, f"instances[{i}].") for i, item in enumerate(items)]
        cls = self.classes.of(req.path, who.klass, p.cls)
        retry = self.shedder.check(cls, p.source) if self.shedder is not None else None
        if retry is not None:  # a shed batch is refused whole (no per-instance stale answers)
            raise self.shedder.reject(cls, retry, f"model {p.name!r}")
        futs = [p.submit(inst, cls) for inst in insts]
        return _answer(asyncio.gather(*futs), lambda answers: {"object": "list", "model": p.name, "data": answers})


async def _with_fallback(p, inst, cls: str):
    """A model with a fallback: remember each answer (fallback = last_served); when scoring fails,
    serve the entity's last answer or the static one (marked "fallback": "last_served" | "static")
    rather than the error, if there is one."""
    try:
        answer = await p.submit(inst, cls)
    except ModelError as e:
        old = await p.fallback(inst, cls)
        if old is None:
            raise e.failure.http() from None
        return json_response(old)
    p.remember(inst, answer)
    return json_response(answer)


def _answer(fut, shape):
    out = asyncio.get_running_loop().create_future()

    def done(f):
        if out.done():
            return
        e = f.exception()
        if e is None:
            out.set_result(json_response(shape(f.result())))
        elif isinstance(e, ModelError):
            out.set_exception(e.failure.http())
        else:
            out.set_exception(e)
    fut.add_done_callback(done)
    return out


def _instance(plan, body, tenant: str, where: str) -> Instance:
    if not isinstance(body, dict):
        raise HttpError(400, f"{where or 'the body'} must be a JSON object with entities and features",
                        "invalid_request_error", param=where.rstrip(".") or None)
    unknown = set(body) - {"entities", "features"}
    if unknown:
        k = sorted(unknown)[0]
        raise HttpError(400, f"unknown parameter {where}{k} (a prediction takes entities and features)",
                        "invalid_request_error", param=where + k)
    entities, features = body.get("entities", {}), body.get("features", {})
    if not isinstance(entities, dict):
        raise HttpError(400, f"{where}entities must be an object {{entity type: id}}", "invalid_request_error",
                        param=where + "entities")
    if not isinstance(features, dict):
        raise HttpError(400, f"{where}features must be an object {{name: number}}", "invalid_request_error",
                        param=where + "features")
    for etype in plan.entity_types:
        eid = entities.get(etype)
        if not isinstance(eid, str) or not 0 < len(eid) <= MAX_ID_CHARS:
            raise HttpError(400, f"{where}entities.{etype}: the model needs a {etype} id (a string of 1 to "
                            f"{MAX_ID_CHARS} characters)", "invalid_request_error", param=f"{where}entities.{etype}")
    for etype in entities:
        if etype not in plan.entity_types:
            raise HttpError(400, f"{where}entities.{etype}: the model reads no {etype!r} features (it takes "
                            f"{', '.join(plan.entity_types) or 'none'})", "invalid_request_error",
                            param=f"{where}entities.{etype}")
    for name in plan.request_names:
        v = features.get(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 3.4e38:
            raise HttpError(400, f"{where}features.{name}: {'required' if v is None else 'must be a finite number'}"
                            " (a request feature of the model)", "invalid_request_error", param=f"{where}features.{name}")
    if len(features) != len(plan.request_names):
        extra = sorted(set(features) - set(plan.request_names))[0]
        raise HttpError(400, f"{where}features.{extra}: not an input of the model (it takes "
                        f"{', '.join(plan.request_names) or 'no request features'})", "invalid_request_error",
                        param=f"{where}features.{extra}")
    return Instance(tenant, entities, features)
