"""Inference worker process: one model, continuous batching, a three-tier prefix cache.

Started by the supervisor (one per configured model) with its spec in $TIDEGATE_WORKER_SPEC. It
binds a ROUTER (core/messaging/endpoints.py: infer-NAME.gGEN.sock); each ingress worker's DEALER
sends requests and receives token deltas for the connections it owns. The batching itself is
core/llm/batcher.py; this module is the process around it, on the blocking-worker loop
(core/runtime/loop.py):

    poll (no wait while sequences run) -> take messages -> admit queued requests -> one
    llama_decode over every running sequence -> send the step's deltas, one frame per ingress
    worker -> save the prefixes that just went in.

On SIGTERM it keeps serving the old generation's ingress workers (draining too) until idle.
"""
from __future__ import annotations

import time

from tidegate.core.base.jsonlog import log
from tidegate.core.llm.batcher import Batcher
from tidegate.core.llm.demo_model import ensure_demo
from tidegate.core.messaging import endpoints, protocol
from tidegate.core.overload.pressure import ClassMonitor, Publisher
from tidegate.core.runtime.loop import BlockingWorker, run_blocking_worker


class InferenceWorker(BlockingWorker):
    def __init__(self, spec: dict):
        super().__init__(spec)
        self.model, self.inf = spec["model"], self.cfg["inference"]
        self.name = self.model["name"]
        self.grace_end = self.idle_since = None
        self.publisher = None  # the pressure PUB socket, bound on the first turn (the sockets exist then)
        self.box: set = set()  # the box-level overload actions on now (the supervisor's BOX)

    def open(self) -> str:
        path = self.model["path"] or ensure_demo(self.cfg["server"]["data_dir"])
        demo = not self.model["path"]
        self.batcher = Batcher.open(path, self.model, self.inf, self.cfg["server"]["data_dir"], self.send,
                                    self.beat_if_due, disk=False)
        self.loaded = dict(model=self.name, path=path, demo=demo, n_ctx=self.model["n_ctx"],
                           max_seqs=self.model["max_seqs"], gpu_offload=self.batcher.engine.gpu,
                           gpu_layers=self.batcher.engine.offloaded,
                           note="demo model: random weights, gibberish output" if demo else None)
        return endpoints.worker(self.cfg, "inference", self.name, self.spec["gen"])

    def open_stores(self) -> None:
        self.batcher.open_disk(self.cfg["server"]["data_dir"])  # the prefix disk tier: one writer
        b = self.batcher
        log.info("inference worker ready", **self.loaded, disk_prefixes=len(b.disk.files) if b.disk else 0)

    def close_stores(self) -> None:
        self.batcher.close_disk()  # after a RELEASE it serves on with the live and RAM tiers

    def on_command(self, msg: dict) -> None:
        """The supervisor's box-level actions: as trim comes on (memory pressure), the prefix RAM
        tier goes (prefixes are recomputed, or read from the disk tier)."""
        if msg.get("op") != protocol.BOX:
            return
        actions = set(msg.get("actions", ()))
        if "trim" in actions and "trim" not in self.box:
            log.warning("memory pressure: dropped the prefix RAM tier", entries=self.batcher.ram.clear())
        self.box = actions

    def handle(self, peer: bytes, op: str, rid, body) -> None:
        b = self.batcher
        if op == protocol.GENERATE:
            b.submit(peer, rid, body)
        elif op == protocol.CANCEL:
            b.cancel(peer, rid)
        elif op == protocol.CREDIT:
            b.credit(peer, rid, body)
        elif op == protocol.EMBED:
            b.embed(peer, rid, body)
        else:
            super().handle(peer, op, rid, body)

    def busy(self) -> bool:  # (sequences paused for their readers wait for a CREDIT message)
        return self.batcher.runnable() or self.batcher.embedding > 0

    def work(self) -> None:
        self.batcher.admit()
        if self.batcher.active:
            self.batcher.step()
        if self.batcher.embedding:  # between decode steps, a budget of it a turn
            self.flush()  # the step's tokens leave first: they never wait for embeddings work
            self.batcher.embed_step()

    def before_sleep(self) -> None:
        self.batcher.save_prefixes()  # after the step's first tokens left: never delays one
        self._publish_pressure()

    def _publish_pressure(self) -> None:
        """Each class's queueing delay and drain rate, for the ingress workers to shed at the door."""
        ov, sched, now = self.cfg["overload"], self.batcher.sched, time.monotonic()
        if self.publisher is None:
            self.monitor = ClassMonitor(ov["delay_target"], ov["delay_interval"])
            self.publisher = Publisher(self.socks.ctx, endpoints.pressure(self.cfg, "inference", self.name,
                                                                          self.spec["gen"]),
                                       f"inference:{self.name}", ov["pressure_interval"])
            self.seen = dict(sched.completed)
        for c, n in sched.completed.items():
            for _ in range(min(n - self.seen[c], 64)):
                self.monitor.finished(c, now)
            self.seen[c] = n
        queued = sched.queued()
        for c, q in self.batcher.embeds.items():
            queued[c] += len(q)
        self.monitor.observe(now, self.batcher.oldest(), queued)
        self.publisher.maybe_publish(self.monitor, now)

    def counters(self) -> dict:
        b = self.batcher
        return dict(b.stats, llm_active_sequences=b.active, llm_paused_sequences=b.paused, llm_queued=b.queued,
                    llm_paused_state_bytes=b.evicted_bytes,
                    prefix_ram_bytes=b.ram.bytes,
                    prefix_disk_bytes=b.disk.bytes if b.disk else 0)

    def drained(self, now: float) -> bool:
        """The old generation's ingress workers are draining too: serve them until idle."""
        self.grace_end = self.grace_end or now + self.cfg["server"]["graceful_timeout"]
        idle = not self.batcher.active and not self.batcher.queued and not self.batcher.evicted
        self.idle_since = (self.idle_since or now) if idle else None
        return bool(self.idle_since and now - self.idle_since > 0.5) or now > self.grace_end



def main() -> None:
    run_blocking_worker(lambda spec: f"inference {spec['model']['name']}", InferenceWorker)


if __name__ == "__main__":
    main()
