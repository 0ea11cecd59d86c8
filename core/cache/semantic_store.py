"""The semantic cache's store: one hnswlib index per namespace, payloads in LMDB.

A namespace is tenant × model × system-prompt hash × conversation-so-far hash (computed by the
ingress worker), so a hit never crosses tenants and a multi-turn answer is only reused in the
same conversation context. What is indexed is the embedding of the last user message.

Lookup: the nearest neighbour is the hit when it reaches the namespace's cosine threshold, the
decision accepts it (core/cache/verifier.py or hitmodel.py), and no other cached text lies within
the contest window below the threshold: a query among several near variants is a miss. Inserts come after the
model answered, off the request path. TTL: expired entries are skipped on lookup and swept
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
from collections import OrderedDict

import hnswlib
import lmdb
import numpy as np
import orjson

from tidegate.core.base.filelock import StoreLock
from tidegate.core.base.metrics import SEMANTIC_VETOES
from tidegate.core.cache.verifier import verify

_ID = struct.Struct(">Q")


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
                 contest_window: float = 0.15, neighbours: int = 10):
        """decision: what the nearest neighbour above the cosine threshold must pass: "verifier"
        (its rules, core/cache/verifier.py) or "model" (the hard conflicts, then the learned
        trees, core/cache/hitmodel.py). contest_window: no other cached text may lie within this
        much cosine below the threshold (of the `neighbours` nearest looked at)."""
        self.contest_window, self.neighbours = contest_window, neighbours
        if decision == "model":
            from tidegate.core.cache.hitmodel import decide, model
            model()  # loaded now: a missing or stale model file fails the start, not a lookup
            self._decide = lambda q, c, cos, min_overlap: decide(q, c, cos)
        else:
            self._decide = lambda q, c, cos, min_overlap: verify(q, c, min_overlap)
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
        self.spaces: dict[str, Namespace] = {}
        # id -> (ns, tenant, text, expires); the answer itself stays in LMDB (read on a hit)
        self.meta: dict[int, tuple] = {}
        self.next_id = 1
        self.stats = {k: 0 for k in ("semantic_lookups", "semantic_hits", "semantic_verifier_rejections",
                                     "semantic_inserts", "semantic_evictions", "semantic_expired",
                                     "semantic_index_rebuilds", "semantic_namespaces_evicted",
                                     "semantic_approximate")}
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
                self.meta[eid] = (ns, tenant, text, expires)
                vectors.setdefault(ns, []).append((eid, vec))
                self.used[ns] = tenant
                self.next_id = max(self.next_id, eid + 1)
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

    def _verdict(self, text: str, near: list, threshold: float, min_overlap: float) -> tuple[bool, str]:
        """Whether near[0] may be served: it reaches the threshold, passes the decision, and no
        other cached text lies within the contest window. Where two near variants are cached
        (flights to Paris and to Rome, X and not X) the embedding cannot say which one a query
        meant, and a wrong hit is worse than a miss."""
        if not near or near[0][1] < threshold:
            return False, "threshold"
        ok, reason = self._decide(text, near[0][2], near[0][1], min_overlap)
        if ok and len(near) > 1:
            return False, "contested"
        return ok, reason

    def lookup(self, ns: str, vec: np.ndarray, text: str, threshold: float, min_overlap: float = 0.8,
               approximate: bool = False):
        """(entry, score) of the hit, or (None, why). approximate: the nearest live neighbour at
        threshold or more, not verified (only ever served marked approximate)."""
        self.stats["semantic_lookups"] += 1
        space = self.spaces.get(ns)
        if space is None or not space.ids:
            return None, "empty"
        near = self._near(space, vec, threshold if approximate else threshold - self.contest_window)
        if approximate:
            if not near:
                return None, "threshold"
            self.stats["semantic_approximate"] += 1
            return self._answer(near[0][0]), near[0][1]
        ok, why = self._verdict(text, near, threshold, min_overlap)
        if ok:
            self.stats["semantic_hits"] += 1
            return self._answer(near[0][0]), near[0][1]
        if why != "threshold":
            self.stats["semantic_verifier_rejections"] += 1
            self.stats[f"semantic_veto_{why}"] += 1
            why = f"verifier:{why}"
        return None, why

    def explain(self, tenant: str | None, vec: np.ndarray, text: str, threshold: float, min_overlap: float = 0.8,
                k: int = 5) -> list[dict]:
        """The k nearest entries to text in a tenant's namespaces (every tenant's when None), best
        first, each with its score and what the decision says of it alone ("decision"); "verdict"
        is what a lookup reaches: for a namespace's nearest hit, below_threshold or veto:REASON
        (veto:contested when another text lies in the window), for the others "contests" (in
        the window) or below_threshold. For operators (`tidegate admin cache explain`)."""
        rows = []
        for ns, space in self.spaces.items():
            if not space.ids or (tenant is not None and self.used.get(ns) != tenant):
                continue
            near = self._near(space, vec, -1.0)
            window = [n for n in near if n[1] >= threshold - self.contest_window]
            ok, why = self._verdict(text, window, threshold, min_overlap)
            for i, (eid, score, cand) in enumerate(near[:k]):
                alone, reason = self._decide(text, cand, score, min_overlap)
                verdict = ("hit" if ok else "below_threshold" if why == "threshold" else f"veto:{why}") if i == 0 \
                    else "contests" if score >= threshold - self.contest_window else "below_threshold"
                rows.append({"namespace": ns, "tenant": self.meta[eid][1], "text": cand, "score": round(score, 4),
                             "decision": "pass" if score >= threshold and alone else
                             "below_threshold" if score < threshold else f"veto:{reason}",
                             "verdict": verdict})
        rows.sort(key=lambda r: -r["score"])
        return rows[:k]

    def insert(self, ns: str, tenant: str, vec: np.ndarray, text: str, entry: dict, ttl: float,
               max_entries: int) -> None:
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
        self.meta[eid] = (ns, tenant, text, expires)
        space.add(vec, eid)
        self.stats["semantic_inserts"] += 1

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
        self.used.pop(ns, None)
        self._unlink_index(ns)
        self.stats["semantic_namespaces_evicted"] += 1

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

    def purge(self, tenant: str | None) -> int:
        ids = [eid for eid, m in self.meta.items() if tenant is None or m[1] == tenant]
        for eid in ids:
            self._delete(eid)
        return len(ids)

    def info(self) -> dict:
        return {"entries": len(self.meta), "namespaces": len(self.spaces), **self.stats}

    def close(self) -> None:
        self.save()
        self.env.close()
        self.lock.release()
