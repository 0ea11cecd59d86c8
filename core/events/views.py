"""Read-optimized views of the event log, materialized into LMDB by the view-builder process.

A view is declared in the config:

    [events]
    views = [{name = "clicks_1h", kind = "count", event_type = "click", window = 3600},
             {name = "spend", kind = "sum", field = "amount"},
             {name = "avg_price", kind = "avg", field = "price", window = 86400},
             {name = "last_page", kind = "last", field = "page"},
             {name = "recent", kind = "last_n", n = 10}]

kinds: count, sum, avg (of a numeric payload field; all time, or over `window` seconds kept as
per-minute buckets and summed when read), last (the last value of a field), last_n (the last n
payloads). As a model input (`events.NAME`, core/features/hydrate.py) a view's keys are ids of
its `entity` type (e.g. user) and `default` is what a key with no value yet reads as. Rows are keyed "view\\0key"; the builder writes them together with its log offsets in
one LMDB transaction, so after a crash nothing is applied twice or skipped. Readers (the
ingress workers) use read-only transactions: they never wait on the writer.
"""
from __future__ import annotations

import os
import time

import lmdb
import numpy as np
import orjson

KINDS = ("count", "sum", "avg", "last", "last_n")


def view_problem(v, cfg=None) -> str | None:
    for i, item in enumerate(v):
        if (not isinstance(item, dict) or not isinstance(item.get("name"), str) or not 0 < len(item["name"]) <= 64
                or "\0" in item["name"]):
            return f"item {i} must be a table with a name of 1 to 64 characters"
        if item.get("kind") not in KINDS:
            return f"item {i}: kind must be one of {', '.join(KINDS)}"
        if item["kind"] in ("sum", "avg", "last") and not isinstance(item.get("field"), str):
            return f"item {i}: kind {item['kind']} needs a field"
        for k, ok, what in (("event_type", lambda v: isinstance(v, str), "a string"),
                            ("field", lambda v: isinstance(v, str), "a string"),
                            ("window", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                             "a number of seconds > 0"),
                            ("n", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 10000,
                             "an integer from 1 to 10000"),
                            ("entity", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
                            ("default", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                             "a number")):
            if k in item and not ok(item[k]):
                return f"item {i}: {k} must be {what}"
        unknown = set(item) - {"name", "kind", "event_type", "field", "window", "n", "entity", "default"}
        if unknown:
            return f"item {i}: unknown field(s) {', '.join(sorted(unknown))}"
    return None


CONFIG_RULES = {"events.views": view_problem}  # checked by config.validate (core/base/config.py)


def offset_key(partition: str) -> bytes:
    return b"offset\0" + partition.encode()


MAX_KEY_BYTES = 511  # LMDB's limit on a key


def row_key(view: str, tenant: str, key: str) -> bytes:
    """Rows are namespaced by tenant: a key of tenant A is invisible to tenant B."""
    return b"\0".join((view.encode(), tenant.encode(), key.encode()))


def apply(view: dict, row: dict | None, event: dict) -> dict | None:
    """The row after event (None: the event does not concern this view)."""
    if view.get("event_type") and event["type"] != view["event_type"]:
        return None
    kind, payload = view["kind"], event.get("payload") or {}
    row = row or {}
    if kind in ("count", "sum", "avg"):
        if kind == "count":
            value = 1.0
        else:
            value = payload.get(view["field"]) if isinstance(payload, dict) else None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None
        if view.get("window"):
            minute = str(int(event["ingest"] // 60))
            b = row.setdefault("buckets", {}).setdefault(minute, [0, 0.0])
            b[0] += 1
            b[1] += value
            horizon = int((event["ingest"] - view["window"]) // 60)
            row["buckets"] = {m: c for m, c in row["buckets"].items() if int(m) >= horizon}
        else:
            row["count"] = row.get("count", 0) + 1
            row["sum"] = row.get("sum", 0.0) + value
    elif kind == "last":
        if not isinstance(payload, dict) or view["field"] not in payload:
            return None
        row = {"value": payload[view["field"]], "at": event["ingest"]}
    else:  # last_n
        items = row.get("items", []) + [payload]
        row = {"items": items[-view.get("n", 10):]}
    return row


def read(view: dict, row: dict | None, now: float | None = None):
    """The view's value for a row (None when the key has none)."""
    if row is None:
        return None
    kind = view["kind"]
    if kind in ("count", "sum", "avg"):
        if view.get("window"):
            horizon = ((now or time.time()) - view["window"]) // 60
            live = [c for m, c in row.get("buckets", {}).items() if int(m) >= horizon]
            count, total = sum(c[0] for c in live), sum(c[1] for c in live)
        else:
            count, total = row.get("count", 0), row.get("sum", 0.0)
        return {"count": count, "sum": total, "avg": total / count if count else None}[kind]
    if kind == "last":
        return row["value"]
    return row["items"]


class ViewReader:
    """Read-only access for ingress workers (and feature hydration): opened lazily after fork."""

    def __init__(self, data_dir: str, views: list[dict]):
        self.path = os.path.join(data_dir, "views")
        self.views = {v["name"]: v for v in views}
        self.env = None

    def _open(self):
        if self.env is None and os.path.exists(os.path.join(self.path, "data.mdb")):
            self.env = lmdb.open(self.path, readonly=True, lock=True, max_dbs=0, subdir=True)
        return self.env

    def get(self, view: str, tenant: str, key: str):
        env = self._open()
        k = row_key(view, tenant, key)
        if env is None or len(k) > MAX_KEY_BYTES:
            return None
        with env.begin() as txn:  # a snapshot: never waits on the builder
            raw = txn.get(k)
        return read(self.views[view], orjson.loads(raw) if raw else None)

    def get_many(self, wants) -> list:
        """[value or None] for wants [(view, tenant, key)], read in one snapshot (a micro-batch)."""
        env = self._open()
        if env is None:
            return [None] * len(wants)
        out = []
        with env.begin() as txn:
            for view, tenant, key in wants:
                k = row_key(view, tenant, key)
                raw = txn.get(k) if len(k) <= MAX_KEY_BYTES else None
                out.append(read(self.views[view], orjson.loads(raw)) if raw else None)
        return out

    def offset(self, partition: str) -> tuple[str, int]:
        """(segment, byte) the view builder has applied partition up to (("", 0) before it starts)."""
        env = self._open()
        if env is None:
            return "", 0
        with env.begin() as txn:
            raw = txn.get(offset_key(partition))
        return tuple(orjson.loads(raw)) if raw else ("", 0)

    def vector(self, tenant: str, key: str, features: list[str]) -> np.ndarray:
        """The key's numeric views in the declared feature order, as float32 (NaN when missing):
        the shape a model's feature hydration wants."""
        out = np.full(len(features), np.nan, dtype=np.float32)
        for i, name in enumerate(features):
            value = self.get(name, tenant, key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[i] = value
        return out
