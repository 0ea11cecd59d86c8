"""Model worker: scores the tabular models declared with `worker = true`, off the ingress loops.

Started by the supervisor when such a model is declared. Binds a ROUTER (models.gGEN.sock);
ingress workers send micro-batches already hydrated, each with its traffic class. Batches wait in
one bounded queue per class; each loop turn takes up to `predict.worker_rows` rows, highest class
first, and scores each model's rows in one call (a second level of batching, across workers),
then answers each batch. Like an inference worker it publishes each class's queueing delay (PUB
models.gGEN.pub), so ingress sheds at the door what this worker cannot drain:

    ingress -> [SCORE, rid, {model, rows: [[x, …], …]}] -> [SCORES, rid, [[y, …], …]] | ERR
"""
from __future__ import annotations

import time

import numpy as np

from tidegate.core.base.config import CLASSES
from tidegate.core.base.jsonlog import log
from tidegate.core.messaging import endpoints, protocol
from tidegate.core.overload.pressure import ClassMonitor, Publisher
from tidegate.core.predict.models import Model, check_inputs
from tidegate.core.predict.pipeline import plan_for
from tidegate.core.runtime.loop import BlockingWorker, run_blocking_worker
from tidegate.ext.ringbuf import Ring


class ModelWorker(BlockingWorker):
    idle_poll_ms = 100

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.stats = {"model_batches": 0, "model_rows": 0, "model_seconds": 0.0, "model_expired": 0,
                      "model_queue_full": 0}
        pc = self.cfg["predict"]
        # one bounded queue per class (ext/ringbuf Rings): a flood of one class fills only its own
        self.queues = {c: Ring(pc["worker_queue"].get(c, 1024)) for c in CLASSES}
        self.monitor = self.publisher = None

    def open(self) -> str:
        self.models = {}
        for m in self.cfg["predict"]["models"]:
            if m.get("worker"):
                self.models[m["name"]] = model = Model(m["path"], m.get("version", ""))
                check_inputs(model, plan_for(m, self.cfg), m["name"])
        log.info("model worker ready", models=", ".join(f"{n}@{m.version}" for n, m in self.models.items()))
        ov = self.cfg["overload"]
        self.monitor = ClassMonitor(ov["delay_target"], ov["delay_interval"])
        return endpoints.worker(self.cfg, "models", "", self.spec["gen"])

    def on_messages(self, msgs: list) -> None:
        now = time.monotonic()
        for peer, (op, rid, body) in msgs:
            if op == protocol.CANCEL:
                continue  # the ingress worker stopped waiting (its timeout): the turn drops it when due
            model = self.models.get(body.get("model")) if op == protocol.SCORE and isinstance(body, dict) else None
            rows = body.get("rows") if model is not None else None
            if model is None or not isinstance(rows, list) or not rows:
                self.send(peer, protocol.error_event(rid, 400, "a score request needs a served model and rows",
                                                     "bad_request"))
                continue
            cls = body.get("cls") if body.get("cls") in CLASSES else "standard"
            sent = body.get("t")  # CLOCK_MONOTONIC is one clock for the whole box
            t = sent if isinstance(sent, float) and sent <= now else now
            if not self.queues[cls].push((t, peer, rid, body["model"], rows)):
                self.stats["model_queue_full"] += 1
                self.send(peer, protocol.error_event(rid, 503, f"too many {cls} batches are waiting for the model "
                                                     "worker; retry shortly", "queue_full"))

    def busy(self) -> bool:
        return any(len(q) for q in self.queues.values())

    def work(self) -> None:
        """One turn: up to predict.worker_rows rows, highest class first, each model's rows scored
        in one call. A batch sent longer ago than predict.worker_timeout is dropped unscored: its
        caller has answered it already."""
        now, budget, expiry = time.monotonic(), self.cfg["predict"]["worker_rows"], self.cfg["predict"]["worker_timeout"]
        by_model: dict[str, list] = {}
        for cls in CLASSES:
            q = self.queues[cls]
            while len(q) and budget > 0:
                t, peer, rid, name, rows = q.pop()
                if now - t > expiry:
                    self.stats["model_expired"] += 1
                    self.send(peer, protocol.error_event(rid, 504, "the batch waited past predict.worker_timeout",
                                                         "deadline_exceeded"))
                    continue
                budget -= len(rows)
                by_model.setdefault(name, []).append((peer, rid, rows))
                self.monitor.finished(cls, now)
        for name, asks in by_model.items():
            self._score(name, asks)

    def _score(self, name: str, asks: list) -> None:
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
            return
        self.stats["model_batches"] += 1
        self.stats["model_rows"] += len(X)
        i = 0
        for peer, rid, rows in asks:
            self.send(peer, [protocol.SCORES, rid, out[i:i + len(rows)].tolist()])
            i += len(rows)

    def before_sleep(self) -> None:
        """Each class's queueing delay, for the ingress workers to shed at the door (source "models")."""
        now = time.monotonic()
        if self.publisher is None:  # bound on the first turn: the sockets exist then
            ov = self.cfg["overload"]
            self.publisher = Publisher(self.socks.ctx, endpoints.pressure(self.cfg, "models", "", self.spec["gen"]),
                                       "models", ov["pressure_interval"])
        oldest = {c: (q.peek()[0] if len(q) else None) for c, q in self.queues.items()}
        self.monitor.observe(now, oldest, {c: len(q) for c, q in self.queues.items()})
        self.publisher.maybe_publish(self.monitor, now)

    def counters(self) -> dict:
        return dict(self.stats, model_queued=sum(len(q) for q in self.queues.values()))


def main() -> None:
    run_blocking_worker(lambda spec: "models", ModelWorker)


if __name__ == "__main__":
    main()
