"""One module per process kind, and the registry of kinds the supervisor keeps running.

A Slot names one process the supervisor keeps alive: its kind, its index among processes of that
kind (ingress slot = its share of the ring and its listening sockets) and a name (the model, for
inference). Its kind says which module runs it; nothing else branches on what a slot is.
"""
from __future__ import annotations

from typing import NamedTuple

from tidegate.core.base import config
from tidegate.core.events.views import CONFIG_RULES as VIEW_RULES
from tidegate.core.features.registry import view_problem as feature_view_problem
from tidegate.core.overload.shedding import policy_problem
from tidegate.core.predict.models import model_problem

INGRESS, INFERENCE, EMBEDDER, VIEWS, MODELS = "ingress", "inference", "embedder", "views", "models"

# kind -> the module run with `python -m` (each has a main())
KINDS = {
    INGRESS: "tidegate.workers.ingress.worker",
    INFERENCE: "tidegate.workers.inference",
    EMBEDDER: "tidegate.workers.embedder",
    VIEWS: "tidegate.workers.viewbuilder",
    MODELS: "tidegate.workers.modelworker",
}

# config checks that domain packages own (config itself imports none of them)
CONFIG_RULES = {**VIEW_RULES, "features.views": feature_view_problem, "predict.models": model_problem,
                "overload.shed": policy_problem}


class Slot(NamedTuple):
    kind: str
    index: int = 0
    name: str = ""

    def __str__(self) -> str:  # "0", "model:NAME", "embedder", "views": what admin shows
        if self.kind == INGRESS:
            return str(self.index)
        return f"model:{self.name}" if self.kind == INFERENCE else self.kind

    @property
    def label(self) -> str:  # how worker ids begin: "ingress-0", "inference-NAME", "embedder", "views"
        if self.kind == INGRESS:
            return f"ingress-{self.index}"
        return f"inference-{self.name}" if self.kind == INFERENCE else self.kind

    @property
    def module(self) -> str:
        return KINDS[self.kind]


def slots(cfg: dict) -> list[Slot]:
    """What the supervisor keeps running for cfg: ingress 0..N-1, one inference worker per model,
    the embedder when the semantic cache is on, the view builder when views are declared, the
    model worker when a tabular model is declared with worker = true."""
    out = [Slot(INGRESS, i) for i in range(config.resolve_workers(cfg))]
    out += [Slot(INFERENCE, 0, m["name"]) for m in config.local_models(cfg)]
    if config.semantic_enabled(cfg):
        out.append(Slot(EMBEDDER))
    if cfg["events"]["enabled"] and cfg["events"]["views"]:
        out.append(Slot(VIEWS))
    if any(m.get("worker") for m in cfg["predict"]["models"]):
        out.append(Slot(MODELS))
    return out


def load_config(path: str | None, overrides: dict | None = None) -> dict:
    """The daemon's config: the schema's checks plus those the domain packages own."""
    return config.load(path, overrides, CONFIG_RULES)
