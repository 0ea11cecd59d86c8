"""The feature registry: one LMDB environment under DATA_DIR/features, a table per (view, version).

A feature view is declared in config: its entity type, its source (`registry`, this LMDB store, or
`redis`, a remote online store read by core/features/sources.py), a TTL (seconds a loaded row
stays valid; 0 = forever) and its features in order, each with a dtype (float32 or int64) and a
default (what hydration uses when the row is missing, late or its source is down). A row is the features of one entity of one tenant,
packed as one numpy record (key: tenant NUL entity), so a read is one LMDB get and a frombuffer.
Loads write a whole new version of a view, then switch the view's `current` pointer in one
transaction: a reader's snapshot sees the old version or the new one, never a mix. Writers are
the CLI (`tidegate features load`), one at a time under the store's flock; ingress workers only
read, in read-only snapshots, and clear stale reader slots when they open it.
"""
from __future__ import annotations

import math
import os
import time

import lmdb
import numpy as np
import orjson

from tidegate.core.base.filelock import StoreLock

DTYPES = {"float32": "<f4", "int64": "<i8"}
SOURCES = ("registry", "redis")
META = b"meta"
EXPIRED = b""  # fetch(): the row exists but is older than the view's ttl


def view_problem(views, cfg=None) -> str | None:
    """The config rule for features.views (see workers/__init__.py)."""
    names = set()
    for i, v in enumerate(views):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not 0 < len(v["name"]) <= 64:
            return f"item {i} must be a table with a name of 1 to 64 characters"
        if v["name"] in names:
            return f"item {i}: view {v['name']!r} is declared twice"
        names.add(v["name"])
        unknown = set(v) - {"name", "entity", "features", "source", "ttl"}
        if unknown:
            return f"item {i}: unknown field(s) {', '.join(sorted(unknown))}"
        if v.get("source", "registry") not in SOURCES:
            return f"item {i}: source must be one of {', '.join(SOURCES)}"
        ttl = v.get("ttl", 0)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl < 0:
            return f"item {i}: ttl must be a number of seconds >= 0 (0 = rows never expire)"
        if not isinstance(v.get("entity", "entity"), str) or not v.get("entity", "entity"):
            return f"item {i}: entity must be a non-empty string (the entity type, e.g. user)"
        feats = v.get("features")
        if not isinstance(feats, list) or not feats:
            return f"item {i}: features must be a non-empty array of {{name, dtype, default}}"
        seen = set()
        for j, f in enumerate(feats):
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"] or f["name"] in seen:
                return f"item {i}: feature {j} needs a unique name"
            seen.add(f["name"])
            if f.get("dtype", "float32") not in DTYPES:
                return f"item {i}: feature {f['name']!r}: dtype must be one of {', '.join(DTYPES)}"
            d = f.get("default", 0)
            if isinstance(d, bool) or not isinstance(d, (int, float)):
                return f"item {i}: feature {f['name']!r}: default must be a number"
            if set(f) - {"name", "dtype", "default"}:
                return f"item {i}: feature {f['name']!r}: unknown field(s) {', '.join(sorted(set(f) - {'name', 'dtype', 'default'}))}"
        if v.get("source") == "redis" and cfg is not None and not cfg["features"]["redis_url"]:
            return f"item {i}: view {v['name']!r} has source = redis but features.redis_url is not set"
    return None


class View:
    """A declared view: the record dtype, the defaults, and how to check a row."""

    def __init__(self, decl: dict):
        self.name, self.entity = decl["name"], decl.get("entity", "entity")
        self.features = [f["name"] for f in decl["features"]]
        self.kinds = [f.get("dtype", "float32") for f in decl["features"]]
        self.dtype = np.dtype([(f, DTYPES[k]) for f, k in zip(self.features, self.kinds)])
        self.defaults = {f["name"]: f.get("default", 0) for f in decl["features"]}
        self.source, self.ttl = decl.get("source", "registry"), float(decl.get("ttl", 0))
        self.all_float = all(k == "float32" for k in self.kinds)  # a row is then one float32 vector

    def pack(self, row: dict, where: str) -> bytes:
        """row {feature: value} (missing ones take their default) as one record; ValueError naming
        where (row and column) when a value does not fit its dtype."""
        rec = np.zeros((), dtype=self.dtype)
        for f, kind in zip(self.features, self.kinds):
            v = row.get(f, self.defaults[f])
            if v is None or v == "":
                v = self.defaults[f]
            try:
                num = float(v) if kind == "float32" else int(v) if not isinstance(v, float) or v.is_integer() else None
            except (TypeError, ValueError):
                num = None
            if num is None or (kind == "float32" and not math.isfinite(num)) or (
                    kind == "int64" and not -(1 << 63) <= num < 1 << 63):
                raise ValueError(f"{where}, column {f!r}: {v!r} is not a {kind}")
            rec[f] = num
        return rec.tobytes()

    def values(self, raw: bytes) -> np.ndarray:
        """The row as float32, in declared order (what a model reads)."""
        if self.all_float:
            return np.frombuffer(raw, dtype="<f4")
        rec = np.frombuffer(raw, dtype=self.dtype)[0]
        return np.array([rec[f] for f in self.features], dtype="<f4")

    def unpack(self, raw: bytes) -> dict:
        rec = np.frombuffer(raw, dtype=self.dtype)[0]
        return {f: (float(rec[f]) if k == "float32" else int(rec[f])) for f, k in zip(self.features, self.kinds)}


def _key(tenant: str, entity: str) -> bytes:
    return tenant.encode() + b"\0" + entity.encode()


MAX_KEY_BYTES = 511  # LMDB's limit on a key


class Registry:
    """Read side (ingress workers) by default; writable=True for a loader (under the store's lock)."""

    def __init__(self, root: str, views: list[dict], map_bytes: int = 1 << 30, writable: bool = False):
        self.root, self.map_bytes, self.writable = root, map_bytes, writable
        self.views = {v["name"]: View(v) for v in views}
        self.env, self.lock = None, None
        if writable:
            self.lock = StoreLock(root).acquire(wait=5.0)  # one loader at a time
            self.env = lmdb.open(root, map_size=map_bytes, subdir=True, max_dbs=4096)

    def _open(self):
        if self.env is None and os.path.exists(os.path.join(self.root, "data.mdb")):
            self.env = lmdb.open(self.root, readonly=True, lock=True, subdir=True, max_dbs=4096)
            self.env.reader_check()  # slots of readers that died (a SIGKILLed worker) come back
        return self.env

    def _meta(self, txn) -> dict:
        raw = txn.get(META)
        return orjson.loads(raw) if raw else {}

    def get(self, view: str, tenant: str, entity: str):
        """(features as a dict, version) or None; one snapshot, so never a mix of versions."""
        if view not in self.views:
            return None
        (raw, version), = self.fetch([(tenant, view, entity)])
        return (self.views[view].unpack(raw), version) if raw else None  # None, or EXPIRED

    def fetch(self, wants, now: float | None = None) -> list[tuple]:
        """[(raw row or None, version)] for wants [(tenant, view, entity)] (a whole micro-batch),
        all read in one snapshot, so never a mix of versions; a row older than its view's ttl
        reads as EXPIRED."""
        env = self._open()
        if env is None:
            return [(None, None)] * len(wants)
        out = []
        with env.begin() as txn:
            meta = self._meta(txn)
            dbs: dict = {}
            for tenant, view, entity in wants:
                version, key = meta.get(view), _key(tenant, entity)
                if version is None or len(key) > MAX_KEY_BYTES:
                    out.append((None, version))
                    continue
                v = self.views[view]
                loaded = meta.get(f"{view}#at", {}).get(tenant)  # None: this tenant never loaded rows
                if v.ttl and loaded is not None and (now or time.time()) - loaded > v.ttl:
                    out.append((EXPIRED, version))
                    continue
                db = dbs.get(view)
                if db is None:
                    db = dbs[view] = env.open_db(f"{view}@{version}".encode(), txn=txn, create=False)
                out.append((txn.get(key, db=db), version))
        return out

    def load(self, view: str, rows, tenant: str, progress=None) -> tuple[int, int]:
        """Write rows [(entity, {feature: value})] as a new version of view, then switch to it.
        Every row is checked first (ValueError naming row and column): nothing is half-loaded.
        Returns (rows, version)."""
        v = self.views[view]
        packed = []
        for i, (entity, row) in enumerate(rows, start=1):
            if not isinstance(entity, str) or not entity or len(_key(tenant, entity)) > MAX_KEY_BYTES:
                raise ValueError(f"row {i}, column {v.entity!r}: the entity id must be 1 to 500 bytes")
            packed.append((_key(tenant, entity), v.pack(row, f"row {i}")))
            if progress:
                progress(1)
        env = self.env
        with env.begin(write=True) as txn:
            meta = self._meta(txn)
            version = max(meta.get(f"{view}#last", 0), meta.get(view) or 0) + 1
            db = env.open_db(f"{view}@{version}".encode(), txn=txn)
            old = meta.get(view)
            if old is not None:  # carry the other tenants' rows over: a load replaces one tenant's
                src = env.open_db(f"{view}@{old}".encode(), txn=txn, create=False)
                prefix = tenant.encode() + b"\0"
                for k, raw in txn.cursor(db=src):
                    if not k.startswith(prefix):
                        txn.put(k, raw, db=db)
            for k, raw in packed:
                txn.put(k, raw, db=db)
            meta[view], meta[f"{view}#last"] = version, version
            meta.setdefault(f"{view}#at", {})[tenant] = time.time()  # when this tenant's rows were loaded (ttl)
            txn.put(META, orjson.dumps(meta))  # the switch: same transaction as the rows
        if old is not None:
            with env.begin(write=True) as txn:
                txn.drop(env.open_db(f"{view}@{old}".encode(), txn=txn, create=False), delete=True)
        env.sync(True)
        return len(packed), version

    def stats(self) -> list[dict]:
        env = self._open()
        out = []
        for name, v in self.views.items():
            row = {"view": name, "entity": v.entity, "features": len(v.features), "version": None, "rows": 0}
            if env is not None:
                with env.begin() as txn:
                    version = self._meta(txn).get(name)
                    if version is not None:
                        db = env.open_db(f"{name}@{version}".encode(), txn=txn, create=False)
                        row.update(version=version, rows=txn.stat(db)["entries"])
            out.append(row)
        return out

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
        if self.lock is not None:
            self.lock.release()
