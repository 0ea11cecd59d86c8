"""This worker's event-log partition, as the owner of its keys.

Each ingress worker owns partition `DATA_DIR/events/p-SLOT`: the ring sends every event whose
key ("ev:" + key) it owns here, by a direct call or one mesh hop (core/state/owners.py). The
append is answered after the group fsync that covers it. A corrupt partition stays shut (every
append raises LogUnavailable naming file and offset) while the worker serves everything else.
"""
from __future__ import annotations

import os

from tidegate.core.base.jsonlog import log
from tidegate.core.events.eventlog import CorruptLog, LogUnavailable, Partition
from tidegate.core.messaging.protocol import EV_APPEND


class PartitionOwner:
    def __init__(self, cfg: dict, slot: int, views, lock=None):
        self.evc, self.slot, self.views = cfg["events"], slot, views
        self.name = f"p-{slot}"
        self.partition, self.corrupt = None, None
        try:
            self.partition = Partition(os.path.join(cfg["server"]["data_dir"], "events", self.name),
                                       self.evc["batch_bytes"], self.evc["window"], self.evc["segment_bytes"],
                                       self.evc["compress"], lock)
        except CorruptLog as e:  # this partition stays shut; the rest of the worker serves
            self.corrupt = f"{e}; run `tidegate admin log repair` (then `tidegate admin reload`)"
            log.error("event log partition refused", partition=self.name, error=self.corrupt)

    def handlers(self) -> dict:
        return {EV_APPEND: self.append}

    def append(self, msg: list):
        """[records, buffered] -> a future of the first sequence number, resolved after the fsync
        (at once when buffered). Raises LogUnavailable while the partition cannot acknowledge."""
        records, buffered = msg
        if self.partition is None:
            raise LogUnavailable(self.corrupt)
        return self.partition.append([r.encode() for r in records], buffered)

    @property
    def stats(self) -> dict:
        return self.partition.stats if self.partition is not None else {}

    def probe(self) -> None:
        """Periodic: a partition stopped by a disk error resumes once a write + fsync works."""
        if self.partition is not None:
            self.partition.probe()

    def retain(self) -> None:
        """Periodic: apply the retention limits, never past what the view builder has read."""
        c = self.evc
        if self.partition is None or not (c["retention_bytes"] or c["retention_age"]):
            return
        applied = self.views.offset(self.name)[0] if c["views"] else None
        for path in self.partition.retain(c["retention_bytes"], c["retention_age"], applied):
            log.info("event log segment retired", file=path)

    def close(self) -> None:
        if self.partition is not None:
            self.partition.close()
