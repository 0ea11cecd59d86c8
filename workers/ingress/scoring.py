"""Scoring a tabular model in the model worker (workers/modelworker.py) from an ingress worker.

`worker_scorer` returns the `score(X, cls)` a Predictor calls: a batch goes to the model worker
over its WorkerClient and comes back as a Future of scores, or fails with ModelError carrying
the Failure to answer with (its breaker open, the worker down, a timeout, the worker's own ERR).
"""
from __future__ import annotations

import time

import numpy as np

from tidegate.core.messaging import protocol
from tidegate.core.messaging.protocol import Failure
from tidegate.core.messaging.worker_client import WorkerUnavailable


class ModelError(Exception):
    """A batch the model worker did not score; .failure says why."""

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


def worker_scorer(client, name: str, timeout: float, breaker, loop):
    def score(X, cls):
        fut = loop.create_future()
        if not breaker.allow():
            raise ModelError(Failure(503, f"the model worker's circuit breaker for {name!r} is open", "circuit_open"))
        t0 = loop.time()

        def on_event(kind, payload):
            timer.cancel()
            if fut.done():
                return
            if kind == protocol.SCORES:
                breaker.record(True, loop.time() - t0)
                fut.set_result(np.asarray(payload, dtype=np.float32))
            else:  # a full queue there is load (shedding's business), not a failure
                failure = Failure.of(payload)
                breaker.record(failure.code == "queue_full")
                fut.set_exception(ModelError(failure))

        def late():
            client.cancel(rid)
            if not fut.done():
                breaker.record(False)
                fut.set_exception(ModelError(Failure(504, f"the model worker did not score {name!r} within "
                                                          f"{timeout}s (predict.worker_timeout)", "model_timeout")))
        try:
            rid = client.submit(protocol.SCORE, {"model": name, "rows": X.tolist(), "cls": cls,
                                                 "t": time.monotonic()}, on_event)
        except WorkerUnavailable as e:
            breaker.record(False)
            raise ModelError(Failure(503, str(e), "worker_unavailable")) from None
        timer = loop.call_later(timeout, late)
        return fut
    return score
