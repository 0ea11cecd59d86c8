"""POST /v1/events: validate a request's events, append them at their partition owners, answer
202 after the fsync that covers them.

Body: one JSON event, a JSON array of events, or NDJSON (one event per line). An event is
{"key": entity id, "type": name, "ts": optional client timestamp (number), "payload": any JSON};
the server adds "ingest" (its time) and the partition assigns the sequence number. Every event
is checked before anything is written: one bad event is a 400 naming its index, and none of
the request is written. Events are partitioned by key on the ring ("ev:" + key), so each key's
events stay in order at one owner; the owner's Partition acknowledges after its group fsync
(`?ack=buffered` opts in to an answer before it, accepting the loss of the last window).
"""
from __future__ import annotations

import asyncio
import os
import time
from urllib.parse import unquote

import orjson

from tidegate.core.eventlog import CorruptLog, LogUnavailable, Partition
from tidegate.core.http11 import HttpError, json_response
from tidegate.core.jsonlog import log
from tidegate.core.mesh import OwnerUnavailable
from tidegate.core.views import ViewReader

APPEND = "ev.append"


class EventService:
    def __init__(self, cfg: dict, slot: int, ring):
        self.cfg, self.slot, self.ring = cfg["events"], slot, ring
        self.views = ViewReader(cfg["server"]["data_dir"], self.cfg["views"])
        self.limits = cfg["limits"]
        self.mesh = None
        self.partition, self.corrupt = None, None
        try:
            self.partition = Partition(os.path.join(cfg["server"]["data_dir"], "events", f"p-{slot}"),
                                       self.cfg["batch_bytes"], self.cfg["window"], self.cfg["segment_bytes"],
                                       self.cfg["compress"])
        except CorruptLog as e:  # this partition stays shut; the rest of the worker serves
            self.corrupt = f"{e}; run `tidegate admin log repair` (then `tidegate admin reload`)"
            log.error("event log partition refused", partition=f"p-{slot}", error=self.corrupt)

    def handlers(self) -> dict:
        return {APPEND: self._append_local}

    def probe(self) -> None:
        """Periodic: a partition stopped by a disk error resumes once a write + fsync works."""
        if self.partition is not None:
            self.partition.probe()

    def retain(self) -> None:
        """Periodic: apply the retention limits to this worker's partition."""
        c = self.cfg
        if self.partition is None or not (c["retention_bytes"] or c["retention_age"]):
            return
        applied = self.views.offset(f"p-{self.slot}")[0] if c["views"] else None
        for path in self.partition.retain(c["retention_bytes"], c["retention_age"], applied):
            log.info("event log segment retired", file=path)

    def _append_local(self, msg: list):
        records, buffered = msg
        try:
            return self._append(records, buffered)
        except LogUnavailable as e:
            raise RuntimeError(str(e)) from None

    def _append(self, records: list[str], buffered: bool):
        if self.partition is None:
            raise LogUnavailable(self.corrupt)
        return self.partition.append([r.encode() for r in records], buffered)

    # ---- the route ----------------------------------------------------------------------------
    def _parse(self, req) -> list:
        body = req.body
        if not body or not body.strip():
            raise HttpError(400, "request body is empty; expected JSON events", "invalid_json")
        text = body.strip()
        try:
            if b"ndjson" in req.headers.get(b"content-type", b""):
                items = _ndjson(text)
            else:
                try:
                    doc = orjson.loads(text)
                    items = doc if isinstance(doc, list) else [doc]
                except orjson.JSONDecodeError:
                    if b"\n" not in text:
                        raise
                    items = _ndjson(text)  # NDJSON sent as application/json
        except orjson.JSONDecodeError as e:
            raise HttpError(400, f"invalid JSON: {e}", "invalid_json") from None
        if len(items) > self.cfg["max_events"]:
            raise HttpError(413, f"more than {self.cfg['max_events']} events in one request", "too_many_events")
        return items

    def _validate(self, items: list) -> list[tuple[str, str]]:
        out, errors, now = [], [], time.time()
        for i, ev in enumerate(items):
            why = None
            if not isinstance(ev, dict):
                why = "an event must be a JSON object"
            elif not isinstance(ev.get("key"), str) or not 0 < len(ev["key"]) <= 256:
                why = "'key' must be a string of 1 to 256 characters"
            elif not isinstance(ev.get("type"), str) or not 0 < len(ev["type"]) <= 64:
                why = "'type' must be a string of 1 to 64 characters"
            elif "ts" in ev and (isinstance(ev["ts"], bool) or not isinstance(ev["ts"], (int, float))):
                why = "'ts' must be a number (seconds since the epoch)"
            elif set(ev) - {"key", "type", "ts", "payload"}:
                why = f"unknown field(s): {', '.join(sorted(set(ev) - {'key', 'type', 'ts', 'payload'}))}"
            if why is None:
                rec = orjson.dumps({"key": ev["key"], "type": ev["type"], "ts": ev.get("ts"),
                                    "payload": ev.get("payload"), "ingest": now}).decode()
                if len(rec) > self.cfg["max_event_bytes"]:
                    why = f"event larger than {self.cfg['max_event_bytes']} bytes"
                else:
                    out.append((ev["key"], rec))
            if why is not None:
                errors.append({"index": i, "message": why})
        if errors:
            raise HttpError(400, f"{len(errors)} invalid event(s); none were written: event {errors[0]['index']}: "
                            f"{errors[0]['message']}", "invalid_events", param=f"events[{errors[0]['index']}]")
        return out

    async def ingest(self, req):
        events = self._validate(self._parse(req))
        buffered = b"ack=buffered" in (req.query or b"")
        by_owner: dict[int, list[str]] = {}
        for key, rec in events:
            by_owner.setdefault(self.ring.owner(b"ev:" + key.encode()), []).append(rec)
        waits = []
        for owner, recs in by_owner.items():
            if owner == self.slot or self.mesh is None:
                try:
                    waits.append(self._append(recs, buffered))
                except LogUnavailable as e:
                    raise HttpError(503, str(e), "log_unavailable", headers=[(b"retry-after", b"1")]) from None
            else:
                fut = asyncio.get_running_loop().create_future()
                self.mesh.request_cb(owner, APPEND, [recs, buffered], self.cfg["owner_timeout"],
                                     lambda ok, res, fut=fut: fut.done() or (
                                         fut.set_result(res) if ok else fut.set_exception(_unavailable(res))))
                waits.append(fut)
        results = await asyncio.gather(*waits, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise HttpError(503, f"the event log did not acknowledge: {failed[0]}", "log_unavailable",
                            headers=[(b"retry-after", b"1")])
        return json_response({"object": "events.accepted", "accepted": len(events),
                              "durable": not buffered}, 202)


    def view(self, req):
        """GET /v1/views/{view}/{key}: one row, read in a read-only LMDB snapshot."""
        parts = req.path.split("/", 4)
        name, key = unquote(parts[3]), unquote(parts[4]) if len(parts) > 4 else ""
        if name not in self.views.views:
            raise HttpError(404, f"no view named {name!r} (declared: {', '.join(self.views.views) or 'none'})",
                            "view_not_found", param="view")
        value = self.views.get(name, key)
        if value is None:
            raise HttpError(404, f"view {name!r} has nothing for key {key!r}", "key_not_found", param="key")
        return json_response({"view": name, "key": key, "kind": self.views.views[name]["kind"], "value": value})


def _ndjson(text: bytes) -> list:
    return [orjson.loads(line) for line in text.split(b"\n") if line.strip()]


def _unavailable(res) -> Exception:
    return res if isinstance(res, (OwnerUnavailable, Exception)) else RuntimeError(str(res))
