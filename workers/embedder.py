"""Embedder process: embeds prompts for the semantic cache and owns its store.

Started by the supervisor when the semantic cache is on. Binds a ROUTER at
ipc://RUN_DIR/embedder.gGEN.sock; every ingress worker's DEALER sends lookups and inserts. Each
loop turn takes everything that has arrived from all ingress workers and embeds it in one
batch (cross-worker batching), then answers the lookups and applies the inserts. Housekeeping
(TTL sweep, compaction, saving the indexes) runs between turns. Exit codes as for other
workers: 0 clean, 3 failed to boot.

    ingress -> ["lookup", rid, {ns, text, threshold, min_overlap}]  -> ["hit", rid, {entry, score}]
                                                                    | ["miss", rid, {why}]
    ingress -> ["insert", 0, {ns, tenant, text, entry, ttl, max_entries}]   (no answer)

Counters go to the supervisor with each heartbeat; purges come from it (`tidegate admin cache`).
"""
from __future__ import annotations

import os
import signal
import time

import orjson
import zmq

from tidegate.core import config
from tidegate.core.embedders import make_embedder
from tidegate.core.jsonlog import log
from tidegate.core.process import WorkerSockets, run_blocking_worker
from tidegate.core.semantic_cache import SemanticStore

SWEEP_S, SAVE_S = 5.0, 30.0


class EmbedderWorker:
    def __init__(self, spec: dict):
        self.spec, self.cfg = spec, spec["config"]
        self.c = self.cfg["cache"]
        self.running, self.draining = True, False
        self.stats = {"embed_batches": 0, "embed_texts": 0, "embed_seconds": 0.0}

    def boot(self) -> None:
        self.embedder = make_embedder(self.c["embedder"], self.c["embedder_model"])
        self.store = SemanticStore(os.path.join(self.cfg["server"]["data_dir"], "semantic"), self.embedder.dim, log)
        self.socks = WorkerSockets(self.spec, config.embedder_endpoint(self.cfg, self.spec["gen"]))
        self.router = self.socks.router
        self.socks.poller.register(self.socks.link, zmq.POLLIN)  # purge commands from the supervisor
        self.socks.ready()
        log.info("embedder ready", embedder=self.embedder.name, dim=self.embedder.dim,
                 entries=len(self.store.meta), rebuilt=self.store.stats["semantic_index_rebuilds"])

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "draining", True))
        signal.signal(signal.SIGQUIT, lambda *_: setattr(self, "running", False))
        now = time.monotonic()
        next_hb, next_sweep, next_save = now, now + SWEEP_S, now + SAVE_S
        while self.running and not self.draining:
            if self.socks.poller.poll(100):
                self._commands()
                self.turn(self.socks.take())
            now = time.monotonic()
            if now >= next_hb:
                next_hb = now + self.cfg["server"]["heartbeat_interval"]
                self._heartbeat()
            if now >= next_sweep:
                next_sweep = now + SWEEP_S
                self.store.sweep()
            if now >= next_save:
                next_save = now + SAVE_S
                self.store.save()
        self._heartbeat()
        self.store.close()
        self.socks.close()

    def _commands(self) -> None:
        while True:
            try:
                msg = orjson.loads(self.socks.link.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            except orjson.JSONDecodeError:
                continue
            if msg.get("op") == "purge":
                n = self.store.purge(msg.get("tenant"))
                log.info("semantic cache purged", tenant=msg.get("tenant") or "(all)", entries=n)

    def turn(self, msgs: list) -> dict:
        """Embed every text of this turn in one batch, then answer. Returns {peer: events}."""
        texts = [m[2]["text"] for _, m in msgs if m[0] in ("lookup", "insert")]
        vecs = None
        if texts:
            t0 = time.perf_counter()
            vecs = self.embedder.embed(texts)
            self.stats["embed_seconds"] += time.perf_counter() - t0
            self.stats["embed_batches"] += 1
            self.stats["embed_texts"] += len(texts)
        out: dict[bytes, list] = {}
        i = 0
        for peer, (op, rid, body) in msgs:
            try:
                if op == "lookup":
                    entry, score = self.store.lookup(body["ns"], vecs[i], body["text"], body["threshold"],
                                                     body["min_overlap"])
                    i += 1
                    event = ["hit", rid, {"entry": entry, "score": score}] if entry is not None else \
                        ["miss", rid, {"why": score}]
                elif op == "insert":
                    self.store.insert(body["ns"], body["tenant"], vecs[i], body["text"], body["entry"], body["ttl"],
                                      body["max_entries"])
                    i += 1
                    continue
                else:
                    event = ["err", rid, [400, f"unknown op {op!r}", "bad_op", None]]
            except Exception as e:  # a bad message must not take the cache down
                log.error("semantic cache op failed", op=op, error=repr(e))
                event = ["err", rid, [500, "semantic cache error", "internal", None]]
            out.setdefault(peer, []).append(event)
        self.socks.send(out)
        return out

    def _heartbeat(self) -> None:
        extra = dict(self.store.stats, **self.stats, semantic_entries=len(self.store.meta))
        self.running = self.socks.heartbeat(extra) and self.running


def main() -> None:
    run_blocking_worker(lambda spec: "embedder", EmbedderWorker)


if __name__ == "__main__":
    main()
