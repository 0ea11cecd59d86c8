"""Model worker: scores the tabular models declared with `worker = true`, off the ingress loops.

Started by the supervisor when such a model is declared. Binds a ROUTER (models.gGEN.sock);
ingress workers send micro-batches already hydrated. Each loop turn takes every batch that has
arrived from all ingress workers and scores each model's rows in one call (a second level of
batching, across workers), then answers each batch:

    ingress -> [SCORE, rid, {model, rows: [[x, …], …]}] -> [SCORES, rid, [[y, …], …]] | ERR
"""
from __future__ import annotations

import time

import numpy as np

from tidegate.core.base.jsonlog import log
from tidegate.core.messaging import endpoints, protocol
from tidegate.core.predict.models import Model, check_inputs
from tidegate.core.predict.pipeline import plan_for
from tidegate.core.runtime.loop import BlockingWorker, run_blocking_worker


class ModelWorker(BlockingWorker):
    idle_poll_ms = 100

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.stats = {"model_batches": 0, "model_rows": 0, "model_seconds": 0.0}

    def open(self) -> str:
        self.models = {}
        for m in self.cfg["predict"]["models"]:
            if m.get("worker"):
                self.models[m["name"]] = model = Model(m["path"], m.get("version", ""))
                check_inputs(model, plan_for(m, self.cfg), m["name"])
        log.info("model worker ready", models=", ".join(f"{n}@{m.version}" for n, m in self.models.items()))
        return endpoints.worker(self.cfg, "models", "", self.spec["gen"])

    def on_messages(self, msgs: list) -> None:
        by_model: dict[str, list] = {}
        for peer, (op, rid, body) in msgs:
            if op == protocol.CANCEL:
                continue  # the ingress worker stopped waiting (its timeout): nothing to undo
            model = self.models.get(body.get("model")) if op == protocol.SCORE and isinstance(body, dict) else None
            rows = body.get("rows") if model is not None else None
            if model is None or not isinstance(rows, list) or not rows:
                self.send(peer, protocol.error_event(rid, 400, "a score request needs a served model and rows",
                                                     "bad_request"))
                continue
            by_model.setdefault(body["model"], []).append((peer, rid, rows))
        for name, asks in by_model.items():
            model = self.models[name]
            try:
                X = np.array([r for _, _, rows in asks for r in rows], dtype=np.float32)
                if X.ndim != 2 or X.shape[1] != model.n_inputs:
                    raise ValueError(f"rows must have {model.n_inputs} values")
                t0 = time.perf_counter()
                out = model.predict(X)
                self.stats["model_seconds"] += time.perf_counter() - t0
            except Exception as e:  # a bad batch must not take the worker down; the others still get theirs
                log.error("scoring failed", model=name, error=repr(e))
                for peer, rid, _ in asks:
                    self.send(peer, protocol.error_event(rid, 500, f"model {name!r} failed to score", "model_error"))
                continue
            self.stats["model_batches"] += 1
            self.stats["model_rows"] += len(X)
            i = 0
            for peer, rid, rows in asks:
                self.send(peer, [protocol.SCORES, rid, out[i:i + len(rows)].tolist()])
                i += len(rows)

    def counters(self) -> dict:
        return dict(self.stats)


def main() -> None:
    run_blocking_worker(lambda spec: "models", ModelWorker)


if __name__ == "__main__":
    main()
