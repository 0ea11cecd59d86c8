"""`tidegate features load | get | stats`: the people's side of the feature registry.

load reads CSV (a header row), JSON lines or Parquet (when pyarrow is installed), checks every
row against the view's schema first (an error names the row and the column, and nothing is
written), then writes a new version and switches to it in one transaction. A view whose source is
redis is written to Redis instead, all rows in one MULTI/EXEC.
"""
from __future__ import annotations

import csv
import os

import orjson

from tidegate.core.features.registry import Registry, View
from tidegate.core.features.sources import redis_key


def _rows(path: str, fmt: str, entity: str):
    if fmt == "csv":
        with open(path, newline="") as f:
            for i, row in enumerate(csv.DictReader(f), start=1):
                if entity not in row:
                    raise ValueError(f"row {i}: no {entity!r} column (the view's entity)")
                yield row.pop(entity), row
    elif fmt == "jsonl":
        with open(path, "rb") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    raise ValueError(f"row {i}: not JSON ({e})") from None
                if not isinstance(row, dict) or entity not in row:
                    raise ValueError(f"row {i}: an object with the {entity!r} field is needed")
                yield str(row.pop(entity)), row
    else:  # parquet
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("reading Parquet needs pyarrow (pip install pyarrow)") from None
        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            if entity not in row:
                raise ValueError(f"row {i}: no {entity!r} column (the view's entity)")
            yield str(row.pop(entity)), row


def registry_dir(cfg: dict) -> str:
    return os.path.join(cfg["server"]["data_dir"], "features")


def load(cfg: dict, view: str, path: str, tenant: str, fmt: str | None = None, progress=None) -> dict:
    views = {v["name"]: v for v in cfg["features"]["views"]}
    if view not in views:
        raise ValueError(f"no feature view named {view!r} in the config (declared: {', '.join(views) or 'none'})")
    fmt = fmt or {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}.get(
        os.path.splitext(path)[1].lower(), "csv")
    rows = list(_rows(path, fmt, views[view].get("entity", "entity")))
    if views[view].get("source") == "redis":
        n = _load_redis(cfg, View(views[view]), rows, tenant, progress(len(rows)) if progress else None)
        return {"view": view, "tenant": tenant, "rows": n, "version": None, "source": "redis"}
    reg = Registry(registry_dir(cfg), cfg["features"]["views"], cfg["features"]["map_bytes"], writable=True)
    try:
        n, version = reg.load(view, rows, tenant, progress(len(rows)) if progress else None)
    finally:
        reg.close()
    return {"view": view, "tenant": tenant, "rows": n, "version": version}


def _load_redis(cfg: dict, v: View, rows, tenant: str, progress=None) -> int:
    """Check every row, then write them all in one MULTI/EXEC: readers see none or all of them
    (each packed row gets the view's ttl as its expiry)."""
    import redis
    fc = cfg["features"]
    checked = []
    for i, (entity, row) in enumerate(rows, start=1):
        if not isinstance(entity, str) or not entity:
            raise ValueError(f"row {i}, column {v.entity!r}: the entity id must not be empty")
        checked.append((entity, v.pack(row, f"row {i}")))
    client = redis.Redis.from_url(fc["redis_url"], socket_timeout=30)
    try:
        return _write_redis(client, fc, v, checked, tenant, progress)
    except redis.RedisError as e:
        raise ValueError(f"Redis at {fc['redis_url']}: {e}") from None
    finally:
        client.close()


def _write_redis(client, fc: dict, v: View, checked: list, tenant: str, progress) -> int:
    pipe = client.pipeline(transaction=True)
    for entity, packed in checked:
        pipe.set(redis_key(fc["redis_prefix"], v.name, tenant, entity), packed,
                 ex=max(1, int(v.ttl)) if v.ttl else None)
        if progress:
            progress(1)
    pipe.execute()
    return len(checked)


def get(cfg: dict, view: str, entity: str, tenant: str):
    decl = next((v for v in cfg["features"]["views"] if v["name"] == view), None)
    if decl is not None and decl.get("source") == "redis":
        import redis
        v, fc = View(decl), cfg["features"]
        client = redis.Redis.from_url(fc["redis_url"], socket_timeout=5)
        try:
            raw = client.get(redis_key(fc["redis_prefix"], view, tenant, entity))
        except redis.RedisError as e:
            raise ValueError(f"Redis at {fc['redis_url']}: {e}") from None
        finally:
            client.close()
        return (v.unpack(raw), None) if raw is not None and len(raw) == v.dtype.itemsize else None
    reg = Registry(registry_dir(cfg), cfg["features"]["views"])
    try:
        return reg.get(view, tenant, entity)
    finally:
        reg.close()


def stats(cfg: dict) -> list[dict]:
    reg = Registry(registry_dir(cfg), cfg["features"]["views"])
    try:
        return reg.stats()
    finally:
        reg.close()
