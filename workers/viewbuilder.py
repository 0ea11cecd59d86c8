"""View-builder process: tails every event-log partition and applies the configured views.

Each pass reads the complete blocks added since its offsets and applies them in one LMDB write
transaction that also stores the new offsets (segment, byte), so a crash between passes applies
nothing twice and skips nothing. A torn block at a tail is simply not complete yet: it is read
again on the next pass. Lag (seconds since the builder was last caught up) is reported with
each heartbeat; /readyz fails while it exceeds `events.view_lag_max`.
"""
from __future__ import annotations

import glob
import os
import signal
import time

import lmdb
import orjson

from tidegate.core.eventlog import CorruptLog, read_blocks, segments
from tidegate.core.jsonlog import log
from tidegate.core.process import WorkerSockets, run_blocking_worker
from tidegate.core.views import apply, offset_key, row_key

PASS_S = 0.05


class ViewBuilder:
    def __init__(self, spec: dict):
        self.spec, self.cfg = spec, spec["config"]
        self.views = self.cfg["events"]["views"]
        self.running = True
        self.stats = {"views_events_applied": 0, "view_lag_seconds": 0.0}
        self.caught_up_at = time.monotonic()

    def boot(self) -> None:
        data = self.cfg["server"]["data_dir"]
        self.root = os.path.join(data, "events")
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.env = lmdb.open(os.path.join(data, "views"), map_size=self.cfg["events"]["views_map_bytes"],
                             subdir=True, max_dbs=0)
        # no clients: the ROUTER is bound only so the worker shape is the same as the others
        self.socks = WorkerSockets(self.spec, f"ipc://{os.path.abspath(self.cfg['server']['run_dir'])}/"
                                   f"views.g{self.spec['gen']}.sock")
        self.socks.ready()
        log.info("view builder ready", views=[v["name"] for v in self.views])

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "running", False))
        signal.signal(signal.SIGQUIT, lambda *_: setattr(self, "running", False))
        next_hb = 0.0
        while self.running:
            behind = self.one_pass()
            now = time.monotonic()
            if not behind:
                self.caught_up_at = now
            self.stats["view_lag_seconds"] = round(now - self.caught_up_at, 3)
            if now >= next_hb:
                next_hb = now + self.cfg["server"]["heartbeat_interval"]
                self.running = self.socks.heartbeat(dict(self.stats)) and self.running
            time.sleep(PASS_S)
        self.env.close()
        self.socks.close()

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
        n = 0
        for path in segments(part):
            base = os.path.basename(path)
            if base < seg:
                continue
            start = pos if base == seg else 0
            blocks = []
            try:
                for _, end, _, records in read_blocks(path, start):
                    blocks.append((end, records))
            except CorruptLog:
                pass  # an incomplete tail: read it again next pass
            if not blocks:
                continue
            with self.env.begin(write=True) as txn:
                rows: dict[bytes, dict | None] = {}
                for _, records in blocks:
                    for rec in records:
                        ev = orjson.loads(rec)
                        for view in self.views:
                            k = row_key(view["name"], ev["key"])
                            if k not in rows:
                                old = txn.get(k)
                                rows[k] = orjson.loads(old) if old else None
                            new = apply(view, rows[k], ev)
                            if new is not None:
                                rows[k] = new
                        n += 1
                for k, row in rows.items():
                    if row is not None:
                        txn.put(k, orjson.dumps(row))
                txn.put(offset_key(name), orjson.dumps([base, blocks[-1][0]]))  # same transaction
            seg, pos = base, blocks[-1][0]
        self.stats["views_events_applied"] += n
        return n


def main() -> None:
    run_blocking_worker(lambda spec: "viewbuilder", ViewBuilder)


if __name__ == "__main__":
    main()
