"""The semantic cache's store: one hnswlib index per namespace, payloads in LMDB.

A namespace is tenant × model × system-prompt hash × conversation-so-far hash (computed by the
ingress worker), so a hit never crosses tenants and a multi-turn answer is only reused in the
same conversation context. What is indexed is the embedding of the last user message.

Lookup: the nearest neighbours from the threshold less `verify_window` are read best first; the
first that the decision serves is the hit: it reaches the threshold (0 = the embedder's
calibrated floor) and the decision accepts it (core/cache/verifier.py or hitmodel.py, each
embedder with its own trees), at the namespace's strictness; or what was learned promotes it
(core/cache/learning.py). What was learned also refuses: an entry verified wrong for a query
this close is not served. The margin rule keeps precision among near variants without refusing
dense neighbourhoods: the hit is refused as "contested" only when another neighbour within
`margin` of it is plausible too (it would be served, or the trees give it 5% or more) and its
answer differs (flights to Paris and to Rome, both plausible for the query). Inserts come after the model answered, off the request path.

Verification (Krites' idea, off the request path): an insert whose query missed near a cached
entry, and an audited hit (the ingress worker asks the model again in the background class),
queue a verification; a bounded number run after each loop turn of the embedder process and
compare the two answers (the same text, or answer embeddings at `answer_agreement` cosine or
more). The outcome teaches the entry (promotion or tightening) and, for audits, the namespace's
error budget. TTL: expired entries are skipped on lookup and swept
periodically; capacity: the oldest entry of a full namespace is evicted (hnswlib
mark_deleted); an index with more deleted than live elements is rebuilt (compaction).

Durability: every entry (namespace, tenant, text, answer, expiry, vector) is written to LMDB
under DATA_DIR/semantic; the indexes are saved beside it periodically and at exit. At start an
index file that is missing, unreadable or does not hold exactly the stored entries is rebuilt
from the payload store: a corrupt index costs start-up time, never a crash. The embedder
process is the only owner.
"""
from __future__ import annotations

import os
import struct
import time
import zlib
from collections import OrderedDict, deque

import hnswlib
import lmdb
import numpy as np
import orjson

from tidegate.core.base.filelock import StoreLock
from tidegate.core.base.metrics import SEMANTIC_VETOES
from tidegate.core.cache.learning import Bounds, ErrorBudget
from tidegate.core.cache.verifier import conflicts, verify

_ID = struct.Struct(">Q")
# the cosine the rules ("verifier") need before they look, per embedder (threshold 0 = this)
RULES_FLOOR = {"wordllama": 0.90, "minilm": 0.80}
# answers are compared on their beginning: a long one costs MiniLM ~10 ms per 128 tokens, and a
# verification runs between two loop turns of the process that answers lookups
ANSWER_CHARS = 512


def answer_text(entry: dict) -> str:
    return str(entry.get("text") or "")


def _answer_key(entry: dict) -> int:
    return zlib.crc32(" ".join(answer_text(entry).split()).lower().encode())


class Namespace:
    __slots__ = ("name", "index", "ids", "deleted", "dirty")
    # (sized by what it holds, doubling as it fills: one preallocated for 1,024 entries was ~2.7 MB
    # at creation, and a client makes a namespace per system prompt or parameter set)

    def __init__(self, name: str, dim: int, capacity: int = 16, path: str | None = None):
        self.name = name
        self.index = hnswlib.Index(space="ip", dim=dim)
        if path is None:
            self.index.init_index(max_elements=capacity, ef_construction=200, M=16)
        else:  # raises on a damaged file
            self.index.load_index(path, max_elements=capacity)
        self.index.set_ef(64)
        self.ids: OrderedDict[int, None] = OrderedDict()  # live ids, oldest first
        self.deleted = 0
        self.dirty = True

    def add(self, vec: np.ndarray, eid: int) -> None:
        if self.index.get_current_count() >= self.index.get_max_elements():
            self.index.resize_index(self.index.get_max_elements() * 2)
        self.index.add_items(vec.reshape(1, -1), np.array([eid]))
        self.ids[eid] = None
        self.dirty = True

    def remove(self, eid: int) -> None:
        if self.ids.pop(eid, "gone") is None:
            self.index.mark_deleted(eid)
            self.deleted += 1
            self.dirty = True


class SemanticStore:
    def __init__(self, root: str, dim: int, log=None, max_bytes: int = 1 << 30, max_namespaces: int = 10000,
                 max_namespaces_per_tenant: int = 1000, lock: StoreLock | None = None, decision: str = "verifier",
                 margin: float = 0.1, neighbours: int = 10, embedder: str = "wordllama", embed=None,
                 verify_window: float = 0.1, answer_agreement: float = 0.9, tighten_gap: float = 0.02,
                 error_budget: float = 0.02, budget_window: int = 200, budget_min_audits: int = 20,
                 verify_queue: int = 1000, contest_probability: float = 0.05, promote_probability: float = 0.5):
        """decision: what a neighbour must pass: "verifier" (its rules, core/cache/verifier.py)
        or "model" (the hard conflicts, then the embedder's learned trees, core/cache/hitmodel.py).
        margin: a hit is contested by another plausible neighbour this close with another answer
        (servable, or with the trees at contest_probability or more). promote_probability: the
        trees' odds a promoted entry still needs.
        embed: texts -> unit vectors (the embedder's), to compare answers when verifying."""
        self.margin, self.neighbours, self.embed = margin, neighbours, embed
        self.verify_window, self.answer_agreement, self.tighten_gap = verify_window, answer_agreement, tighten_gap
        self.budget_limits = {"budget": error_budget, "window": budget_window, "min_audits": budget_min_audits}
        self.traded, self._prob = False, None
        self.contest_probability, self.promote_probability = contest_probability, promote_probability
        if decision == "model":
            from tidegate.core.cache.hitmodel import decide, model
            m = model(embedder)  # loaded now: a missing or stale model file fails the start, not a lookup
            self.floor, self.traded, self._prob = m.cos_floor, m.traded, m.prob
            self._decide = lambda q, c, cos, min_overlap, strict: decide(q, c, cos, embedder, strict)
        else:
            self.floor = RULES_FLOOR.get(embedder, 0.90)
            self._decide = lambda q, c, cos, min_overlap, strict: verify(q, c, min_overlap)
        self.cos_strict = decision != "model"  # strictness raises the cosine needed (rules) or the probability
        os.makedirs(root, mode=0o700, exist_ok=True)
        self.lock = lock or StoreLock(root).acquire()  # one writer: a second one fails here
        self.root, self.dim, self.log = root, dim, log
        # every namespace costs an index: bounded in all and per tenant, least recently used dropped first
        self.max_namespaces, self.max_per_tenant = max_namespaces, max_namespaces_per_tenant
        self.used: OrderedDict[str, str] = OrderedDict()  # namespace -> its tenant, least recently used first
        # a cache: no fsync per insert (they would stall every durable store's fsync on the disk);
        # save() syncs with the index files, and a crash only loses the entries since then
        self.env = lmdb.open(os.path.join(root, "payloads"), map_size=max_bytes, subdir=True, max_dbs=1,
                             sync=False)
        # what verification taught (entries' bounds, namespaces' budgets): small, rewritten in place
        self.learned_env = lmdb.open(os.path.join(root, "learned"), map_size=max(1 << 24, max_bytes // 16),
                                     subdir=True, max_dbs=1, sync=False)
        self.spaces: dict[str, Namespace] = {}
        # id -> (ns, tenant, text, expires, answer key); the answer itself stays in LMDB (read on a hit)
        self.meta: dict[int, tuple] = {}
        self.bounds: dict[int, Bounds] = {}
        self.budgets: dict[str, ErrorBudget] = {}
        self.queue: deque = deque()  # verifications waiting: (kind, ns, eid, score, answer text, new eid)
        self.max_queue = verify_queue
        self.next_id = 1
        self.stats = {k: 0 for k in ("semantic_lookups", "semantic_hits", "semantic_verifier_rejections",
                                     "semantic_inserts", "semantic_evictions", "semantic_expired",
                                     "semantic_index_rebuilds", "semantic_namespaces_evicted",
                                     "semantic_approximate", "semantic_promoted_hits", "semantic_verifications",
                                     "semantic_verified_same", "semantic_verified_different",
                                     "semantic_verify_dropped", "semantic_audits", "semantic_audit_wrong")}
        self.stats.update({f"semantic_veto_{r}": 0 for r in SEMANTIC_VETOES})
        self._load()

    # ---- start-up -----------------------------------------------------------------------------
    def _load(self) -> None:
        vectors: dict[str, list] = {}
        with self.env.begin() as txn:
            for k, v in txn.cursor():
                eid = _ID.unpack(k)[0]
                vec = np.frombuffer(v[: self.dim * 4], dtype=np.float32)
                ns, tenant, text, entry, expires = orjson.loads(v[self.dim * 4:])
                self.meta[eid] = (ns, tenant, text, expires, _answer_key(entry))
                vectors.setdefault(ns, []).append((eid, vec))
                self.used[ns] = tenant
                self.next_id = max(self.next_id, eid + 1)
        with self.learned_env.begin() as txn:
            for k, v in txn.cursor():
                if k.startswith(b"e"):
                    eid = _ID.unpack(k[1:])[0]
                    if eid in self.meta:
                        self.bounds[eid] = Bounds.from_json(orjson.loads(v))
                elif k.startswith(b"n") and k[1:].decode() in vectors:
                    self.budgets[k[1:].decode()] = ErrorBudget.from_json(orjson.loads(v), **self.budget_limits)
        for ns, items in vectors.items():
            items.sort()
            space = self._open_index(ns, [eid for eid, _ in items])
            if space is None:
                space = self._rebuild(ns, items)
            self.spaces[ns] = space

    def _index_path(self, ns: str) -> str:
        return os.path.join(self.root, f"index-{ns}.bin")

    def _open_index(self, ns: str, ids: list[int]):
        path = self._index_path(ns)
        if not os.path.exists(path):
            return None
        try:
            # hnswlib trusts the offsets in its file: check the checksum saved beside it first
            with open(path, "rb") as f:
                crc = zlib.crc32(f.read())
            with open(path + ".crc") as f:
                if int(f.read().strip()) != crc:
                    raise ValueError("checksum mismatch")
            space = Namespace(ns, self.dim, max(16, len(ids) * 2), path)
            held = set(space.index.get_ids_list())
            if not set(ids) <= held:
                raise ValueError("index does not hold every stored entry")
            for eid in held - set(ids):
                space.index.mark_deleted(eid)
                space.deleted += 1
            for eid in ids:
                space.ids[eid] = None
            space.dirty = False
            return space
        except Exception as e:  # hnswlib raises RuntimeError on a damaged file
            if self.log:
                self.log.warning("semantic index unusable; rebuilding it from the payload store", file=path,
                                 error=str(e))
            return None

    def _rebuild(self, ns: str, items: list) -> Namespace:
        self.stats["semantic_index_rebuilds"] += 1
        space = Namespace(ns, self.dim, max(16, len(items) * 2))
        if items:
            space.index.add_items(np.stack([v for _, v in items]), np.array([eid for eid, _ in items]))
            for eid, _ in items:
                space.ids[eid] = None
        return space

    # ---- lookups and inserts ------------------------------------------------------------------
    def _near(self, space: Namespace, vec: np.ndarray, floor: float) -> list[tuple[int, float, str]]:
        """(id, score, text) of the distinct live texts at cosine >= floor, best first."""
        labels, dists = space.index.knn_query(vec.reshape(1, -1), k=min(self.neighbours, len(space.ids)))
        now, near, seen = time.time(), [], set()
        for eid, dist in zip(labels[0], dists[0]):
            score, eid = 1.0 - float(dist), int(eid)
            if score < floor:
                break
            meta = self.meta.get(eid)
            if meta is None or meta[2] in seen:
                continue  # (the same text cached twice: one candidate)
            if meta[3] < now:
                self._delete(eid)
                self.stats["semantic_expired"] += 1
                continue
            seen.add(meta[2])
            near.append((eid, score, meta[2]))
        return near

    def threshold_of(self, threshold: float) -> float:
        return threshold if threshold > 0 else self.floor

    def _serves(self, text: str, eid: int, score: float, threshold: float, min_overlap: float,
                strict: float) -> tuple[bool, str]:
        """Whether entry eid may be served for text at this cosine: (True, "" | "promoted") or
        (False, why)."""
        b = self.bounds.get(eid)
        if b is not None and b.refuses(score, self.tighten_gap):
            return False, "tightened"
        cand = self.meta[eid][2]
        needed = threshold + (strict if self.cos_strict else 0.0)
        if score >= needed:
            ok, why = self._decide(text, cand, score, min_overlap, 0.0 if self.cos_strict else strict)
            if ok:
                return True, ""
        else:
            why = "threshold"
        # promoted: as close as a verified rephrasing, no hard conflict, and (the trees) plausible:
        # a verified pair says queries this close can mean the same, not that every one does
        if b is not None and strict == 0.0 and b.promotes(score, self.tighten_gap) \
                and not conflicts(text, cand, self.traded) \
                and (self._prob is None or self._prob(text, cand, score) >= self.promote_probability):
            return True, "promoted"
        return False, why

    def _verdict(self, ns: str, text: str, near: list, threshold: float, min_overlap: float):
        """(index of the neighbour served or -1, why, how: "" | "promoted"). The first neighbour
        the decision serves is the hit, unless another within `margin` of it is plausible too
        with another answer: which one the query meant is then a guess, and a wrong hit is worse
        than a miss."""
        budget = self.budgets.get(ns)
        strict = budget.strictness if budget is not None else 0.0
        first_why, refused = "threshold", set()  # (those the decision already refused: not asked twice)
        for i, (eid, score, _) in enumerate(near):
            ok, how = self._serves(text, eid, score, threshold, min_overlap, strict)
            if not ok:
                refused.add(eid)
                if i == 0:
                    first_why = how
                continue
            mine = self._group(eid)
            for j, (other, oscore, _) in enumerate(near):
                if j == i or oscore < score - self.margin or self._group(other) == mine:
                    continue
                if self._plausible(text, other, oscore, threshold, min_overlap, strict, other in refused):
                    return -1, "contested", ""
            return i, "", how
        return -1, first_why, ""

    def _plausible(self, text: str, eid: int, score: float, threshold: float, min_overlap: float,
                   strict: float, refused: bool = False) -> bool:
        """Whether another neighbour could be what the query meant: it would be served, or (the
        trees) it clears the threshold with no hard conflict and contest_probability or more: a
        low bar (0.05), since a wrong hit costs more than a miss (PAWS in lookup mode: precision
        0.83 at 0.5, 0.95 at 0.05, for 8% of the recall). refused: the decision already said no."""
        if not refused and self._serves(text, eid, score, threshold, min_overlap, strict)[0]:
            return True
        if self._prob is None or score < threshold:
            return False
        cand = self.meta[eid][2]
        return not conflicts(text, cand, self.traded) and self._prob(text, cand, score) >= self.contest_probability

    def _group(self, eid: int):
        """Entries in one group never contest each other: the same answer, or verified alike."""
        b = self.bounds.get(eid)
        return ("g", b.group) if b is not None and b.group else ("a", self.meta[eid][4])

    def lookup(self, ns: str, vec: np.ndarray, text: str, threshold: float, min_overlap: float = 0.8,
               approximate: bool = False):
        """(entry, score, id, how) of the hit (how: "" or "promoted"), or (None, why, 0, "").
        approximate: the nearest live neighbour at threshold or more, not verified (only ever
        served marked approximate)."""
        self.stats["semantic_lookups"] += 1
        space = self.spaces.get(ns)
        if space is None or not space.ids:
            return None, "empty", 0, ""
        threshold = self.threshold_of(threshold)
        near = self._near(space, vec, threshold if approximate else threshold - self.verify_window)
        if approximate:
            if not near:
                return None, "threshold", 0, ""
            self.stats["semantic_approximate"] += 1
            return self._answer(near[0][0]), near[0][1], near[0][0], "approximate"
        i, why, how = self._verdict(ns, text, near, threshold, min_overlap)
        if i >= 0:
            self.stats["semantic_hits"] += 1
            self.stats["semantic_promoted_hits"] += how == "promoted"
            return self._answer(near[i][0]), near[i][1], near[i][0], how
        if why != "threshold":
            self.stats["semantic_verifier_rejections"] += 1
            self.stats[f"semantic_veto_{why}"] += 1
            why = f"verifier:{why}"
        return None, why, 0, ""

    def explain(self, tenant: str | None, vec: np.ndarray, text: str, threshold: float, min_overlap: float = 0.8,
                k: int = 5) -> list[dict]:
        """The k nearest entries to text in a tenant's namespaces (every tenant's when None), best
        first, each with its score, what the decision says of it alone ("decision": pass,
        promoted, below_threshold or veto:REASON), what was learned of it ("learned": the
        verified same/different cosines) and the namespace's error budget; "verdict" is what a
        lookup reaches: "hit" for the neighbour served, else the lookup's reason on the nearest
        (below_threshold, veto:REASON, veto:contested), "-" on the others. For operators
        (`tidegate admin cache explain`); the others say how they stand alone ("contests" when
        they would be served too)."""
        rows = []
        threshold = self.threshold_of(threshold)
        for ns, space in self.spaces.items():
            if not space.ids or (tenant is not None and self.used.get(ns) != tenant):
                continue
            near = self._near(space, vec, -1.0)
            window = [n for n in near if n[1] >= threshold - self.verify_window]
            served, why, _ = self._verdict(ns, text, window, threshold, min_overlap)
            budget = self.budgets.get(ns)
            strict = budget.strictness if budget is not None else 0.0
            for i, (eid, score, cand) in enumerate(near[:k]):
                ok, how = self._serves(text, eid, score, threshold, min_overlap, strict)
                if i == served:
                    verdict = "hit"
                elif i == 0 and served < 0:  # the lookup's own reason
                    verdict = "below_threshold" if why == "threshold" else f"veto:{why}"
                else:  # (another is served, or the nearest fails): how this one stands alone
                    verdict = "contests" if ok else "below_threshold" if how == "threshold" else f"veto:{how}"
                b = self.bounds.get(eid)
                rows.append({"namespace": ns, "tenant": self.meta[eid][1], "text": cand, "score": round(score, 4),
                             "decision": (how or "pass") if ok else "below_threshold" if how == "threshold"
                             else f"veto:{how}", "verdict": verdict,
                             "learned": {"same_from": b.lo, "different_at": b.hi, "same": b.same,
                                         "different": b.different} if b is not None else None,
                             "budget": budget.report() if budget is not None else None})
        rows.sort(key=lambda r: -r["score"])
        return rows[:k]

    def insert(self, ns: str, tenant: str, vec: np.ndarray, text: str, entry: dict, ttl: float,
               max_entries: int, verify: bool = False, threshold: float = 0.0) -> None:
        """Store an answer. verify: its query missed; queue a check of its answer against the
        nearest other entry within the verification window (a near-miss to learn from)."""
        if verify and self.embed is not None and ns in self.spaces and self.spaces[ns].ids:
            floor = self.threshold_of(threshold) - self.verify_window
            near = [n for n in self._near(self.spaces[ns], vec, floor) if n[2] != text]
            if near:
                self._enqueue(("near", ns, near[0][0], near[0][1], answer_text(entry), self.next_id))
        space = self.spaces.get(ns)
        if space is None:
            self._make_room(tenant)
            space = self.spaces[ns] = Namespace(ns, self.dim)
        self.used[ns] = tenant
        self.used.move_to_end(ns)
        while len(space.ids) >= max_entries:
            self._delete(next(iter(space.ids)))
            self.stats["semantic_evictions"] += 1
        eid = self.next_id
        self.next_id += 1
        expires = time.time() + ttl
        with self.env.begin(write=True) as txn:
            txn.put(_ID.pack(eid), vec.astype(np.float32).tobytes() + orjson.dumps((ns, tenant, text, entry, expires)))
        self.meta[eid] = (ns, tenant, text, expires, _answer_key(entry))
        space.add(vec, eid)
        self.stats["semantic_inserts"] += 1

    # ---- verification ---------------------------------------------------------------------------
    def audit(self, ns: str, eid: int, score: float, answer: str) -> None:
        """A served hit's answer as the model gives it now (the ingress worker's background audit)."""
        self._enqueue(("audit", ns, eid, score, answer, 0))

    def _enqueue(self, job: tuple) -> None:
        if len(self.queue) >= self.max_queue:  # bounded: the oldest waits longest, it goes first
            self.queue.popleft()
            self.stats["semantic_verify_dropped"] += 1
        self.queue.append(job)

    def verify_some(self, n: int) -> int:
        """Run up to n queued verifications (a loop turn's share): how many ran."""
        done = 0
        while self.queue and done < n:
            kind, _, eid, score, answer, new_eid = self.queue.popleft()
            if eid not in self.meta:
                continue  # (evicted or expired since)
            ns = self.meta[eid][0]  # (the entry's own namespace, whatever the message said)
            done += 1
            same = self.agree(answer_text(self._answer(eid)), answer)
            self.learn(ns, eid, score, same, audit=kind == "audit", new_eid=new_eid)
        return done

    def agree(self, a: str, b: str) -> bool:
        """Whether two answers say the same: the same words, or embeddings this close."""
        if " ".join(a.split()).lower() == " ".join(b.split()).lower():
            return True
        if not a.strip() or not b.strip():
            return False
        va, vb = self.embed([a[:ANSWER_CHARS], b[:ANSWER_CHARS]])
        return float(np.dot(va, vb)) >= self.answer_agreement

    def learn(self, ns: str, eid: int, score: float, same: bool, audit: bool = False, new_eid: int = 0) -> None:
        """One verified outcome: the entry's bounds, its group, the namespace's budget."""
        self.stats["semantic_verifications"] += 1
        self.stats["semantic_verified_same" if same else "semantic_verified_different"] += 1
        b = self.bounds.setdefault(eid, Bounds())
        b.learn(score, same)
        if same and new_eid in self.meta:  # the near-miss's own entry joins the group
            b.group = b.group or eid
            self.bounds.setdefault(new_eid, Bounds()).group = b.group
            self._save_learned(b"e" + _ID.pack(new_eid), self.bounds[new_eid].to_json())
        self._save_learned(b"e" + _ID.pack(eid), b.to_json())
        if audit:
            self.stats["semantic_audits"] += 1
            self.stats["semantic_audit_wrong"] += not same
            budget = self.budgets.get(ns)
            if budget is None:
                budget = self.budgets[ns] = ErrorBudget(**self.budget_limits)
            budget.observe(not same)
            self._save_learned(b"n" + ns.encode(), budget.to_json())

    def _save_learned(self, key: bytes, value) -> None:
        with self.learned_env.begin(write=True) as txn:
            txn.put(key, orjson.dumps(value))

    def _make_room(self, tenant: str) -> None:
        """Before a new namespace: drop the tenant's least recently used one at its cap, else the
        least recently used of all at the total cap."""
        mine = [ns for ns, t in self.used.items() if t == tenant]
        if len(mine) >= self.max_per_tenant:
            self.drop_namespace(mine[0])
        elif len(self.used) >= self.max_namespaces:
            self.drop_namespace(next(iter(self.used)))

    def drop_namespace(self, ns: str) -> None:
        for eid in [eid for eid, m in self.meta.items() if m[0] == ns]:
            self._delete(eid)
        self.spaces.pop(ns, None)
        self._drop_budget(ns)
        self.used.pop(ns, None)
        self._unlink_index(ns)
        self.stats["semantic_namespaces_evicted"] += 1

    def _drop_budget(self, ns: str) -> None:
        if self.budgets.pop(ns, None) is not None:
            with self.learned_env.begin(write=True) as txn:
                txn.delete(b"n" + ns.encode())

    def _unlink_index(self, ns: str) -> None:
        for suffix in ("", ".crc"):
            try:
                os.unlink(self._index_path(ns) + suffix)
            except OSError:
                pass

    def _answer(self, eid: int) -> dict:
        with self.env.begin() as txn:
            return orjson.loads(txn.get(_ID.pack(eid))[self.dim * 4:])[3]

    def _delete(self, eid: int) -> None:
        meta = self.meta.pop(eid, None)
        if meta is None:
            return
        with self.env.begin(write=True) as txn:
            txn.delete(_ID.pack(eid))
        if self.bounds.pop(eid, None) is not None:
            with self.learned_env.begin(write=True) as txn:
                txn.delete(b"e" + _ID.pack(eid))
        space = self.spaces.get(meta[0])
        if space is not None:
            space.remove(eid)

    # ---- housekeeping -------------------------------------------------------------------------
    def sweep(self) -> None:
        """Drop expired entries; rebuild indexes that hold more deleted than live elements."""
        now = time.time()
        for eid in [eid for eid, m in self.meta.items() if m[3] < now]:
            self._delete(eid)
            self.stats["semantic_expired"] += 1
        for ns, space in list(self.spaces.items()):
            if space.deleted > max(64, len(space.ids)):
                items = [(eid, space.index.get_items([eid])[0].astype(np.float32)) for eid in space.ids]
                self.spaces[ns] = self._rebuild(ns, items)
                self.stats["semantic_index_rebuilds"] -= 1  # a compaction, not a repair
            if not self.spaces[ns].ids:
                del self.spaces[ns]
                self.used.pop(ns, None)
                self._unlink_index(ns)
                self._drop_budget(ns)

    def save(self) -> None:
        for ns, space in self.spaces.items():
            if space.dirty:
                path = self._index_path(ns)
                space.index.save_index(path + ".tmp")
                with open(path + ".tmp", "rb") as f:
                    crc = zlib.crc32(f.read())
                with open(path + ".crc.tmp", "w") as f:
                    f.write(str(crc))
                os.replace(path + ".tmp", path)
                os.replace(path + ".crc.tmp", path + ".crc")
                space.dirty = False
        self.env.sync()
        self.learned_env.sync()

    def purge(self, tenant: str | None) -> int:
        ids = [eid for eid, m in self.meta.items() if tenant is None or m[1] == tenant]
        for eid in ids:
            self._delete(eid)
        return len(ids)

    def info(self) -> dict:
        return {"entries": len(self.meta), "namespaces": len(self.spaces), **self.stats}

    def gauges(self) -> dict:
        return {"semantic_verify_queued": len(self.queue),
                "semantic_strict_namespaces": sum(1 for b in self.budgets.values() if b.strictness > 0)}

    def close(self) -> None:
        self.save()
        self.env.close()
        self.learned_env.close()
        self.lock.release()
