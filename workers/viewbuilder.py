"""View-builder process: tails every event-log partition and applies the configured views.

Each pass reads the complete blocks added since its offsets, up to the partition's durable mark
(what its writer has fsynced: an event never acknowledged is never applied) and applies them in
one LMDB write
transaction that also stores the new offsets (segment, byte), so a crash between passes applies
nothing twice and skips nothing. A torn block at a tail is simply not complete yet: it is read
again on the next pass. Lag (seconds since the builder was last caught up) is reported with
each heartbeat; /readyz fails while it exceeds `events.view_lag_max`. It has no clients: it
runs the blocking-worker loop (core/runtime/loop.py) with one pass as its work, every PASS_S.
"""
from __future__ import annotations

import glob
import os
import time

import lmdb
import orjson

from tidegate.core.events.eventlog import CorruptLog, read_blocks, read_durable, segments
from tidegate.core.base.filelock import StoreLock
from tidegate.core.base.jsonlog import log
from tidegate.core.messaging import endpoints
from tidegate.core.runtime.loop import BlockingWorker, run_blocking_worker
from tidegate.core.events.views import MAX_KEY_BYTES, apply, offset_key, row_key

PASS_S = 0.05
FULL_RETRY_S = 5.0  # a full store is tried again this often (a reload with a larger views_map_bytes empties the wait)


class ViewBuilder(BlockingWorker):
    idle_poll_ms = int(PASS_S * 1000)  # the poll is the pause between passes

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.views = self.cfg["events"]["views"]
        self.stats = {"views_events_applied": 0, "views_quarantined": 0, "view_lag_seconds": 0.0, "views_full": 0}
        self.caught_up_at = time.monotonic()
        self.full_until = 0.0  # the store was full: no pass before then

    def open(self) -> str:
        data = self.cfg["server"]["data_dir"]
        self.root = os.path.join(data, "events")
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.env = None
        return endpoints.worker(self.cfg, "views", "", self.spec["gen"])  # no clients: the shape of the others

    def open_stores(self) -> None:
        path = os.path.join(self.cfg["server"]["data_dir"], "views")
        self.lock = StoreLock(path).acquire()  # one writer; the ingress workers only read
        self.env = lmdb.open(path, map_size=self.cfg["events"]["views_map_bytes"], subdir=True, max_dbs=0)
        log.info("view builder ready", views=[v["name"] for v in self.views])

    def close_stores(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
            self.lock.release()

    def work(self) -> None:
        if self.env is None:  # released to the next generation
            return
        now = time.monotonic()
        if now < self.full_until:
            self.stats["view_lag_seconds"] = round(now - self.caught_up_at, 3)
            return
        try:
            behind = self.one_pass()
        except lmdb.MapFullError as e:  # stopped, reported, lagging: never a crash loop (each respawn hid the lag)
            self._full(str(e))
            behind = True
        else:
            self.stats["views_full"] = 0
        now = time.monotonic()
        if not behind:
            self.caught_up_at = now
        self.stats["view_lag_seconds"] = round(now - self.caught_up_at, 3)

    def counters(self) -> dict:
        return dict(self.stats)

    def _full(self, error: str) -> None:
        """The views store reached events.views_map_bytes. The transaction was aborted (its offsets
        too: nothing is skipped); the view holding the most is named, and passes pause."""
        if not self.stats["views_full"]:
            log.error("views store full", largest_view=self._largest_view(), hint="the view builder stops until "
                      "it has room: raise events.views_map_bytes and reload, or trim the view",
                      map_bytes=self.cfg["events"]["views_map_bytes"], error=error)
        self.stats["views_full"] = 1
        self.full_until = time.monotonic() + FULL_RETRY_S

    def _largest_view(self) -> str:
        sizes: dict[str, int] = {}
        with self.env.begin() as txn:
            for k, v in txn.cursor():
                name = k.split(b"\x00", 1)[0].decode("utf-8", "replace")
                sizes[name] = sizes.get(name, 0) + len(k) + len(v)
        return max(sizes, key=sizes.get, default="")

    def one_pass(self) -> bool:
        """Apply what is new in every partition; True if there was anything (still behind)."""
        applied = 0
        for part in sorted(glob.glob(os.path.join(self.root, "p-*"))):
            applied += self._partition(part)
        return applied > 0

    def _partition(self, part: str) -> int:
        name = os.path.basename(part)
        with self.env.begin() as txn:
            raw = txn.get(offset_key(name))
        seg, pos = orjson.loads(raw) if raw else ("", 0)
        mark = read_durable(part)  # never past the fsync: an event not yet durable may still be cut
        n = 0
        for path in segments(part):
            base = os.path.basename(path)
            if base < seg:
                continue
            if mark is not None and base > mark[0]:
                break
            start = pos if base == seg else 0
            stop = mark[1] if mark is not None and base == mark[0] else None
            blocks = []
            try:
                for begin, end, _, records in read_blocks(path, start, stop):
                    blocks.append((begin, end, records))
            except CorruptLog:
                pass  # an incomplete tail: read it again next pass
            if not blocks:
                continue
            with self.env.begin(write=True) as txn:
                rows: dict[bytes, dict | None] = {}
                for begin, _, records in blocks:
                    for i, rec in enumerate(records):
                        try:
                            rows.update(self._apply(txn, rows, rec))
                        except Exception as e:  # quarantined: counted, logged where it is, skipped
                            self.stats["views_quarantined"] += 1
                            log.error("event quarantined: the view builder cannot apply it", partition=name,
                                      segment=base, block_offset=begin, record=i, error=repr(e))
                        n += 1
                for k, row in rows.items():
                    if row is not None:
                        txn.put(k, orjson.dumps(row))
                txn.put(offset_key(name), orjson.dumps([base, blocks[-1][1]]))  # same transaction
            seg, pos = base, blocks[-1][1]
        self.stats["views_events_applied"] += n
        return n


    def _apply(self, txn, rows: dict, rec: bytes) -> dict:
        """The rows one event changes, staged: nothing of it lands unless all of it applies."""
        ev = orjson.loads(rec)
        tenant, key, staged = ev.get("tenant", ""), ev["key"], {}
        for view in self.views:
            k = row_key(view["name"], tenant, key)
            if len(k) > MAX_KEY_BYTES:
                raise ValueError(f"row key of {len(k)} bytes exceeds LMDB's {MAX_KEY_BYTES}")
            row = staged.get(k, rows.get(k))
            if row is None and k not in rows:
                old = txn.get(k)
                row = orjson.loads(old) if old else None
            new = apply(view, row, ev)
            staged[k] = new if new is not None else row
        return staged


def main() -> None:
    run_blocking_worker(lambda spec: "viewbuilder", ViewBuilder)


if __name__ == "__main__":
    main()
