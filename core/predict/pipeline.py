"""One model's prediction pipeline: micro-batch → hydrate → score → one answer per request.

Each (model, traffic class) has a MicroBatcher; a batch is hydrated together (the registry and
event views inline, the Redis views in one round trip within the class's deadline) and scored
in one call, inline in the ingress worker or, for a model declared `worker = true`, in the model
worker over ZeroMQ. The class is the model's declared class, else the caller's.
"""
from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import orjson

from tidegate.core.base.config import CLASSES
from tidegate.core.features.hydrate import Hydrator, Instance, Plan
from tidegate.core.features.registry import View
from tidegate.core.predict.microbatch import MicroBatcher


def _chain(value, fut: asyncio.Future) -> None:
    """Settle fut with value, or with the outcome of value when it is a future."""
    if not isinstance(value, asyncio.Future):
        fut.set_result(value)
    else:
        value.add_done_callback(lambda f: fut.set_exception(f.exception()) if f.exception() is not None
                                else fut.set_result(f.result()))


def plan_for(decl: dict, cfg: dict) -> Plan:
    fviews = {v["name"]: View(v) for v in cfg["features"]["views"]}
    eviews = {v["name"]: v for v in cfg["events"]["views"]} if cfg["events"]["enabled"] else {}
    return Plan(decl.get("inputs"), fviews, eviews)


class Predictor:
    def __init__(self, decl: dict, plan: Plan, hydrator: Hydrator, score, version: str, loop, pcfg: dict,
                 last_served=None):
        """score(X, cls) -> (n, k) array, or an awaitable of one (the model worker). last_served: a
        store at the key's ring owner (the exact cache's) for models with fallback = last_served."""
        self.name, self.plan, self.hydrator, self.score, self.version = decl["name"], plan, hydrator, score, version
        self.cls = decl.get("class")
        self.source = "models" if decl.get("worker") else "ingress"  # whose pressure sheds it
        self.last_served = last_served if decl.get("fallback") == "last_served" else None
        self.static = decl.get("static") or None  # the configured answer of last resort
        self.has_fallback = self.last_served is not None or self.static is not None
        self.remote = bool(hydrator.remote_views(plan))
        self.defaulted = 0  # inputs that took their default, for /metrics
        self.batchers = {c: MicroBatcher(loop, lambda items, c=c: self._run(items, c), pcfg["max_batch"],
                                         pcfg["max_delay"]) for c in CLASSES}

    def submit(self, inst: Instance, cls: str) -> asyncio.Future:
        """The answer's body (a dict) for one instance of class cls, once its batch is scored."""
        return self.batchers[cls].submit(inst)

    def _run(self, batch: list[Instance], cls: str):
        """The batch's answers, or a future of them (Redis to read, or the model worker)."""
        X, reasons = self.hydrator.local(self.plan, batch)
        if not self.remote:
            return self._score(X, reasons, cls)
        answers = asyncio.get_running_loop().create_future()

        def hydrated(_):
            try:
                out = self._score(X, reasons, cls)
            except Exception as e:
                answers.set_exception(e)
                return
            _chain(out, answers)
        self.hydrator.fill_remote(self.plan, batch, X, reasons, cls).add_done_callback(hydrated)
        return answers

    def _score(self, X, reasons, cls):
        out = self.score(X, cls)
        if isinstance(out, np.ndarray):
            return self._answers(X, reasons, out, cls)
        answers = asyncio.get_running_loop().create_future()
        out.add_done_callback(lambda f: answers.set_exception(f.exception()) if f.exception() is not None
                              else answers.set_result(self._answers(X, reasons, f.result(), cls)))
        return answers

    def _answers(self, X: np.ndarray, reasons: list, out: np.ndarray, cls: str) -> list[dict]:
        names = self.plan.names
        single = out.shape[1] == 1
        self.defaulted += sum(map(len, reasons))
        answers = []
        for i, row in enumerate(X.tolist()):
            a = {"object": "prediction", "model": self.name, "version": self.version, "class": cls}
            if single:
                a["score"] = float(out[i, 0])
            else:
                a["scores"] = out[i].tolist()
            a["features"] = dict(zip(names, row))
            a["defaulted"] = reasons[i]
            answers.append(a)
        return answers

    # ---- the last answer served to an entity: the fallback when scoring fails (and when shedding) ----
    def _served_key(self, inst: Instance) -> str:
        ids = [inst.entities[e] for e in self.plan.entity_types]
        return hashlib.sha256(orjson.dumps(["last_served", inst.tenant, self.name, ids])).hexdigest()

    def remember(self, inst: Instance, answer: dict) -> None:
        if self.last_served is not None:
            self.last_served.put(self._served_key(inst), inst.tenant, answer)

    async def fallback(self, inst: Instance, cls: str):
        """The last answer served for this instance's entities, else the model's static answer
        (each marked as the fallback it is), or None."""
        if self.last_served is not None:
            entry = await self.last_served.get(self._served_key(inst))
            if entry is not None:
                return dict(entry, fallback="last_served")
        if self.static is not None:
            return {"object": "prediction", "model": self.name, "version": self.version, "class": cls,
                    **self.static, "fallback": "static"}
        return None

    @property
    def stats(self) -> dict:
        return {"batches": sum(b.stats["batches"] for b in self.batchers.values()),
                "items": sum(b.stats["items"] for b in self.batchers.values()), "defaulted": self.defaulted}
