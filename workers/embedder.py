"""Embedder process: embeds prompts for the semantic cache and owns its store.

Started by the supervisor when the semantic cache is on. Binds a ROUTER (embedder.gGEN.sock);
every ingress worker's DEALER sends lookups and inserts. Each loop turn takes everything that
has arrived from all ingress workers and embeds it in one batch (cross-worker batching), then
answers the lookups and applies the inserts; then it runs a few queued verifications (the
store's: near-misses and audited hits, answers compared: `semantic_verify_per_turn`), so they
never hold a lookup longer than that. Housekeeping (TTL sweep, saving the indexes) runs on timers
between turns.

    ingress -> [LOOKUP, rid, {ns, text, threshold, min_overlap}] -> [HIT, rid, {entry, score}]
                                                                  | [MISS, rid, {why}]
    ingress -> [INSERT, 0, {ns, tenant, text, entry, ttl, max_entries, verify, threshold}]   (no answer)
    ingress -> [AUDIT, 0, {ns, id, score, answer}]   (no answer: a verification is queued)
    supervisor -> [EXPLAIN, rid, {tenant, text, threshold, min_overlap, k}] -> [EXPLAIN, rid, {nearest}]

Counters go to the supervisor with each heartbeat; purges come from it (`tidegate admin cache`).
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict

from tidegate.core.base.jsonlog import log
from tidegate.core.cache.embedders import make_embedder
from tidegate.core.cache.semantic_store import SemanticStore
from tidegate.core.messaging import endpoints, protocol
from tidegate.core.runtime.loop import BlockingWorker, run_blocking_worker

SWEEP_S, SAVE_S = 5.0, 30.0
RECENT = 4096  # texts whose vectors are kept (an insert comes soon after its lookup)
EMBEDS = (protocol.LOOKUP, protocol.INSERT, protocol.EXPLAIN)  # the ops whose text is embedded


class EmbedderWorker(BlockingWorker):
    idle_poll_ms = 100

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.c = self.cfg["cache"]
        self.stats = {"embed_batches": 0, "embed_texts": 0, "embed_seconds": 0.0, "embed_reused": 0}
        self.recent: OrderedDict[str, object] = OrderedDict()  # text -> its vector, least recently used first
        self._store_stats: dict = {}

    def open(self) -> str:
        self.embedder = make_embedder(self.c["embedder"], self.c["embedder_model"], self.cfg["server"]["data_dir"],
                                      self.c["embedder_threads"], self.c["embedder_quant"])
        self.store = None
        self.every(SWEEP_S, lambda: self.store and self.store.sweep())
        self.every(SAVE_S, lambda: self.store and self.store.save())
        return endpoints.worker(self.cfg, "embedder", "", self.spec["gen"])

    def open_stores(self) -> None:
        self.store = SemanticStore(os.path.join(self.cfg["server"]["data_dir"], "semantic"), self.embedder.dim, log,
                                   max_namespaces=self.c["semantic_max_namespaces"],
                                   max_namespaces_per_tenant=self.c["semantic_max_namespaces_per_tenant"],
                                   decision=self.c["semantic_decision"], embedder=self.embedder.name,
                                   margin=self.c["semantic_margin"], neighbours=self.c["semantic_neighbours"],
                                   embed=self.embedder.embed, verify_window=self.c["semantic_verify_window"],
                                   answer_agreement=self.c["semantic_answer_agreement"],
                                   tighten_gap=self.c["semantic_tighten_gap"],
                                   error_budget=self.c["semantic_error_budget"],
                                   budget_window=self.c["semantic_budget_window"],
                                   budget_min_audits=self.c["semantic_budget_min_audits"],
                                   verify_queue=self.c["semantic_verify_queue"],
                                   contest_probability=self.c["semantic_contest_probability"],
                                   promote_probability=self.c["semantic_promote_probability"])
        log.info("embedder ready", embedder=self.embedder.name, dim=self.embedder.dim,
                 decision=self.c["semantic_decision"], threshold=self.store.threshold_of(self.c["semantic_threshold"]),
                 entries=len(self.store.meta), rebuilt=self.store.stats["semantic_index_rebuilds"])

    def close_stores(self) -> None:
        """After a RELEASE lookups are misses and inserts are dropped until the process exits."""
        if self.store is not None:
            store, self.store = self.store, None
            self._store_stats = dict(store.stats, semantic_entries=len(store.meta))
            store.close()

    def on_command(self, msg: dict) -> None:
        if msg["op"] == protocol.PURGE and self.store is not None:
            n = self.store.purge(msg.get("tenant"))
            log.info("semantic cache purged", tenant=msg.get("tenant") or "(all)", entries=n)

    def on_messages(self, msgs: list) -> None:
        """Embed every text of this turn in one batch, then answer."""
        texts = [m[2]["text"] for _, m in msgs if m[0] in EMBEDS]
        vecs = self._vectors(texts) if texts else None
        i = 0
        for peer, (op, rid, body) in msgs:
            try:
                if self.store is None:  # released to the next generation: a miss, nothing stored
                    if op == protocol.LOOKUP:
                        self.send(peer, [protocol.MISS, rid, {"why": "released"}])
                    if op == protocol.EXPLAIN:
                        self.send(peer, [protocol.EXPLAIN, rid, {"nearest": [], "note": "released"}])
                    i += op in EMBEDS
                    continue
                if op == protocol.LOOKUP:
                    entry, score, eid, how = self.store.lookup(body["ns"], vecs[i], body["text"], body["threshold"],
                                                               body["min_overlap"],
                                                               approximate=body.get("approximate", False))
                    i += 1
                    self.send(peer, [protocol.HIT, rid, {"entry": entry, "score": score, "id": eid, "how": how}]
                              if entry is not None else [protocol.MISS, rid, {"why": score}])
                elif op == protocol.EXPLAIN:
                    nearest = self.store.explain(body.get("tenant"), vecs[i], body["text"], body["threshold"],
                                                 body["min_overlap"], int(body.get("k") or 5))
                    i += 1
                    self.send(peer, [protocol.EXPLAIN, rid, {"nearest": nearest, "embedder": self.embedder.name,
                                                             "threshold": self.store.threshold_of(body["threshold"])}])
                elif op == protocol.INSERT:
                    self.store.insert(body["ns"], body["tenant"], vecs[i], body["text"], body["entry"], body["ttl"],
                                      body["max_entries"], bool(body.get("verify")), float(body.get("threshold") or 0))
                    i += 1
                elif op == protocol.AUDIT:
                    self.store.audit(str(body["ns"]), int(body["id"]), float(body["score"]), str(body["answer"]))
                else:
                    self.send(peer, protocol.error_event(rid, 400, f"unknown op {op!r}", "bad_op"))
            except Exception as e:  # a bad message must not take the cache down
                log.error("semantic cache op failed", op=op, error=repr(e))
                self.send(peer, protocol.error_event(rid, 500, "semantic cache error", "internal"))

    def _vectors(self, texts: list[str]) -> list:
        """The texts' embeddings: those embedded lately come from `recent` (an insert follows its
        own miss's lookup: the same text, embedded once; with MiniLM that was 14 ms a sentence
        spent again, just when the client's next lookup arrived), the rest in one batch."""
        todo = list(dict.fromkeys(t for t in texts if t not in self.recent))
        if todo:
            t0 = time.perf_counter()
            for t, v in zip(todo, self.embedder.embed(todo)):
                self.recent[t] = v
            self.stats["embed_seconds"] += time.perf_counter() - t0
            self.stats["embed_batches"] += 1
            self.stats["embed_texts"] += len(todo)
        out = []
        for t in texts:
            self.recent.move_to_end(t)
            out.append(self.recent[t])
        while len(self.recent) > RECENT:
            self.recent.popitem(last=False)
        self.stats["embed_reused"] += len(texts) - len(todo)
        return out

    def busy(self) -> bool:
        return self.store is not None and bool(self.store.queue)

    def before_sleep(self) -> None:
        """A few verifications, once the turn's answers went out (flush comes before this)."""
        if self.store is not None and self.store.queue:
            try:
                self.store.verify_some(self.c["semantic_verify_per_turn"])
            except Exception as e:  # (a full learned-store map, a failed embed: not the cache's end)
                log.error("semantic verification failed", error=repr(e))

    def counters(self) -> dict:
        if self.store is None:
            return dict(self._store_stats, **self.stats)
        return dict(self.store.stats, **self.stats, **self.store.gauges(), semantic_entries=len(self.store.meta))


def main() -> None:
    run_blocking_worker(lambda spec: "embedder", EmbedderWorker)


if __name__ == "__main__":
    main()
