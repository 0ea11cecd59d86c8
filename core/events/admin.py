"""`tidegate admin log stats | tail | repair`: read the partitions under data_dir directly.

stats and tail only read; repair cuts a partition at its first bad block.
"""
from __future__ import annotations

import glob
import os

import orjson

from tidegate.core.base.filelock import is_locked
from tidegate.core.events.eventlog import CorruptLog, read_all, read_blocks, recover, segments
from tidegate.core.events.views import ViewReader


def admin_log(cfg: dict, action: str, key: str | None = None, n: int = 10) -> tuple[int, list]:
    """`tidegate admin log stats | tail | repair`: (exit code 0/1, rows)."""
    root = os.path.join(cfg["server"]["data_dir"], "events")
    parts = sorted(glob.glob(os.path.join(root, "p-*")))
    rows, code = [], 0
    views = ViewReader(cfg["server"]["data_dir"], cfg["events"]["views"]) if cfg["events"]["views"] else None
    for part in parts:
        name = os.path.basename(part)
        if action == "repair":
            if is_locked(part):  # a worker has it open (a corrupt partition is shut, so it is not)
                rows.append({"partition": name, "problem": "open by a running worker: not touched"})
                continue
            before = sum(os.path.getsize(p) for p in segments(part))
            next_seq = _repair(part)
            after = sum(os.path.getsize(p) for p in segments(part))
            rows.append({"partition": name, "next_seq": next_seq, "bytes_cut": before - after})
            continue
        try:
            records = list(read_all(part))
            problem = ""
        except CorruptLog as e:
            records, problem, code = [], str(e), 1
        if action == "stats":
            segs = segments(part)
            rows.append({"partition": name, "segments": len(segs), "bytes": sum(os.path.getsize(p) for p in segs),
                         "events": len(records), "next_seq": records[-1][0] + 1 if records else 0,
                         "views_behind_bytes": _views_behind(views, name, segs), "problem": problem or None})
        else:  # tail
            for seq, payload in records:
                ev = orjson.loads(payload)
                if key is None or ev["key"] == key:
                    rows.append({"partition": name, "seq": seq, **ev})
    if action == "tail":
        rows = sorted(rows, key=lambda r: r["ingest"])[-n:]
    return code, rows


def _views_behind(reader, partition: str, segs: list[str]):
    """Bytes of the log the view builder has not applied yet (None without views)."""
    if reader is None:
        return None
    seg, pos = reader.offset(partition)
    behind = 0
    for p in segs:
        base = os.path.basename(p)
        behind += os.path.getsize(p) - pos if base == seg else (os.path.getsize(p) if base > seg else 0)
    return behind


def _repair(directory: str) -> int:
    """Cut each damaged segment at its first bad block and keep every segment after it: the
    damage costs the records from the bad block to that segment's end, never intact segments
    (dropping those had lost four good segments for one flipped byte in the oldest)."""
    for path in segments(directory):
        try:
            for _ in read_blocks(path):
                pass
        except CorruptLog as e:
            with open(path, "r+b") as f:
                f.truncate(e.offset)
                os.fsync(f.fileno())
    return recover(directory)
