"""POST /v1/events: validate a request's events, append them at their partition owners, answer
202 after the fsync that covers them.

Body: one JSON event, a JSON array of events, or NDJSON (one event per line). An event is
{"key": entity id (of the caller's tenant), "type": name, "ts": optional client timestamp (number), "payload": any JSON};
the server adds "ingest" (its time) and the partition assigns the sequence number. Every event
is checked before anything is written: one bad event is a 400 naming its index, and none of
the request is written. Events are partitioned by key on the ring ("ev:" + key), so each key's
events stay in order at one owner; the owner's partition (core/events/owner.py) acknowledges after its group fsync
(`?ack=buffered` opts in to an answer before it, accepting the loss of the last window).
"""
from __future__ import annotations

import asyncio
import time

import orjson

from tidegate.core.events.eventlog import LogUnavailable
from tidegate.core.http.http11 import HttpError, json_response, service_unavailable
from tidegate.core.http.jsonbody import checked_body
from tidegate.core.messaging.protocol import EV_APPEND
from tidegate.workers.ingress.guard import caller


class EventRoutes:
    def __init__(self, cfg: dict, owners):
        self.evc, self.limits, self.owners = cfg["events"], cfg["limits"], owners

    def add_to(self, router, guard) -> None:
        router.add("POST", "/v1/events", guard(self.ingest))

    def _parse(self, req) -> list:
        body = checked_body(req, self.limits)  # content type, nesting depth, number sizes
        if not body.strip():
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
        if len(items) > self.evc["max_events"]:
            raise HttpError(413, f"more than {self.evc['max_events']} events in one request", "too_many_events")
        return items

    def _validate(self, items: list, tenant: str) -> list[tuple[str, str]]:
        out, errors, now = [], [], time.time()
        for i, ev in enumerate(items):
            why = None
            if not isinstance(ev, dict):
                why = "an event must be a JSON object"
            elif (not isinstance(ev.get("key"), str) or not 0 < len(ev["key"].encode("utf-8", "replace")) <= 256
                  or "\0" in ev["key"]):
                why = "'key' must be a string of 1 to 256 bytes (UTF-8) without NUL"
            elif not isinstance(ev.get("type"), str) or not 0 < len(ev["type"]) <= 64:
                why = "'type' must be a string of 1 to 64 characters"
            elif "ts" in ev and (isinstance(ev["ts"], bool) or not isinstance(ev["ts"], (int, float))):
                why = "'ts' must be a number (seconds since the epoch)"
            elif set(ev) - {"key", "type", "ts", "payload"}:
                why = f"unknown field(s): {', '.join(sorted(set(ev) - {'key', 'type', 'ts', 'payload'}))}"
            if why is None:
                rec = orjson.dumps({"tenant": tenant, "key": ev["key"], "type": ev["type"], "ts": ev.get("ts"),
                                    "payload": ev.get("payload"), "ingest": now}).decode()
                if len(rec) > self.evc["max_event_bytes"]:
                    why = f"event larger than {self.evc['max_event_bytes']} bytes"
                else:
                    out.append((ev["key"], rec))
            if why is not None:
                errors.append({"index": i, "message": why})
        if errors:
            raise HttpError(400, f"{len(errors)} invalid event(s); none were written: event {errors[0]['index']}: "
                            f"{errors[0]['message']}", "invalid_events", param=f"events[{errors[0]['index']}]")
        return out

    async def ingest(self, req):
        tenant = caller(req).tenant
        events = self._validate(self._parse(req), tenant)
        buffered = b"ack=buffered" in (req.query or b"")
        owners, by_owner, prefix = self.owners, {}, b"ev:" + tenant.encode() + b"\0"
        for key, rec in events:  # a tenant's key keeps its order at one owner
            by_owner.setdefault(owners.owner_of(prefix + key.encode()), []).append(rec)
        waits = []
        for owner, recs in by_owner.items():
            try:
                waits.append(owners.call(owner, EV_APPEND, [recs, buffered], self.evc["owner_timeout"]))
            except LogUnavailable as e:  # this worker's own partition cannot acknowledge
                raise service_unavailable(str(e), "log_unavailable") from None
        results = await asyncio.gather(*waits, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise service_unavailable(f"the event log did not acknowledge: {failed[0]}", "log_unavailable")
        return json_response({"object": "events.accepted", "accepted": len(events),
                              "durable": not buffered}, 202)


def _ndjson(text: bytes) -> list:
    return [orjson.loads(line) for line in text.split(b"\n") if line.strip()]
