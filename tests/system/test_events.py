"""POST /v1/events end to end: shapes, all-or-nothing validation, and no acknowledged event lost
when partition owners are killed during sustained writes."""
import glob
import json
import os
import random
import signal
import threading
import time
from collections import defaultdict

import orjson

from helpers.http import request

from tidegate.core.events.eventlog import read_all


def post_events(d, body: bytes, ctype="application/json", query=""):
    return request(d.port, "POST", "/v1/events" + query, body, headers={"Content-Type": ctype}, timeout=10)


def logged(d) -> list[dict]:
    out = []
    for part in sorted(glob.glob(os.path.join(d.sections["server"]["data_dir"], "events", "p-*"))):
        out += [orjson.loads(p) for _, p in read_all(part)]
    return out


def test_object_array_and_ndjson_are_accepted_and_logged(daemon_factory):
    d = daemon_factory(workers=2)
    r = post_events(d, b'{"key": "u1", "type": "click", "payload": {"x": 1}}')
    assert r.status == 202 and r.json()["accepted"] == 1 and r.json()["durable"] is True
    r = post_events(d, json.dumps([{"key": f"u{i}", "type": "view", "ts": 1.5} for i in range(20)]).encode())
    assert r.status == 202 and r.json()["accepted"] == 20
    nd = b"\n".join(json.dumps({"key": "u1", "type": "buy", "payload": {"n": i}}).encode() for i in range(5))
    assert post_events(d, nd, "application/x-ndjson").json()["accepted"] == 5
    assert post_events(d, b'{"key": "u2", "type": "x"}', query="?ack=buffered").json()["durable"] is False
    d.stop()
    events = logged(d)
    assert len(events) == 27 and all("ingest" in e for e in events)
    assert [e["payload"]["n"] for e in events if e["type"] == "buy"] == [0, 1, 2, 3, 4]  # in order per key


def test_a_bad_event_rejects_the_whole_request(daemon_factory):
    d = daemon_factory()
    body = json.dumps([{"key": "a", "type": "t"}, {"key": "", "type": "t"}, {"key": "c", "type": "t"}]).encode()
    r = post_events(d, body)
    assert r.status == 400 and r.json()["error"]["param"] == "events[1]" and "none were written" in r.json()["error"]["message"]
    assert post_events(d, b"[1, 2").status == 400
    assert post_events(d, b'{"key": "a", "type": "t", "extra": 1}').json()["error"]["param"] == "events[0]"
    d.stop()
    assert logged(d) == []


def test_sigkill_of_owners_during_writes_loses_no_acknowledged_event(daemon_factory):
    d = daemon_factory(workers=2, server={"respawn_backoff_max": 0.2})
    acked, stop = [], threading.Event()

    def writer(w):
        n = 0
        while not stop.is_set():
            batch = [{"key": f"k{w}-{j}", "type": "t", "payload": {"n": n, "w": w, "j": j}} for j in range(5)]
            try:
                r = post_events(d, json.dumps(batch).encode())
            except OSError:
                r = None
            if r is not None and r.status == 202:
                acked.extend((b["key"], b["payload"]["n"]) for b in batch)
            n += 1
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    rnd = random.Random(7)
    for _ in range(6):
        time.sleep(0.4)
        rows = [r for r in d.admin_json("workers")["body"] if r["id"].startswith("ingress-") and r["state"] == "ready"]
        if rows:
            os.kill(rnd.choice(rows)["pid"], signal.SIGKILL)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    d.stop()
    events = logged(d)
    seen = defaultdict(int)
    by_key = defaultdict(list)
    for e in events:
        seen[(e["key"], e["payload"]["n"])] += 1
        by_key[e["key"]].append(e["payload"]["n"])
    assert len(acked) > 100
    missing = [a for a in acked if seen[a] == 0]
    assert not missing, missing[:5]
    assert all(seen[a] == 1 for a in acked)  # exactly once
    assert all(ns == sorted(ns) for ns in by_key.values())  # in order per key


VIEWS = [{"name": "clicks", "kind": "count", "event_type": "click"},
         {"name": "clicks_1h", "kind": "count", "event_type": "click", "window": 3600},
         {"name": "spend", "kind": "sum", "field": "amount"},
         {"name": "avg_spend", "kind": "avg", "field": "amount", "window": 86400},
         {"name": "last_page", "kind": "last", "field": "page"},
         {"name": "recent", "kind": "last_n", "n": 3}]


def test_views_are_materialized_and_read(daemon_factory):
    d = daemon_factory(workers=2, events={"views": VIEWS})
    evs = [{"key": "u1", "type": "click", "payload": {"page": f"/p{i}"}} for i in range(4)]
    evs += [{"key": "u1", "type": "buy", "payload": {"amount": a}} for a in (10, 20.5)]
    evs += [{"key": "u2", "type": "click", "payload": {"page": "/home"}}]
    assert post_events(d, json.dumps(evs).encode()).status == 202

    def view(name, key):
        return request(d.port, path=f"/v1/views/{name}/{key}")
    deadline = time.time() + 10
    while time.time() < deadline and view("recent", "u1").status != 200:
        time.sleep(0.1)
    while time.time() < deadline and len(view("recent", "u1").json()["value"]) < 3:
        time.sleep(0.1)
    assert view("clicks", "u1").json()["value"] == 4 and view("clicks_1h", "u1").json()["value"] == 4
    assert view("spend", "u1").json()["value"] == 30.5 and view("avg_spend", "u1").json()["value"] == 15.25
    assert view("last_page", "u1").json()["value"] == "/p3" and view("last_page", "u2").json()["value"] == "/home"
    assert [p.get("amount") for p in view("recent", "u1").json()["value"]] == [None, 10, 20.5]
    assert view("clicks", "nobody").status == 404 and view("nope", "u1").status == 404
    ready = request(d.port, path="/readyz").json()
    assert ready["ready"] and ready["view_lag_seconds"] < 5
    assert sum(r["views_behind_bytes"] for r in d.admin_json("log", "stats")) == 0  # all applied
    # the feature API: a row as a vector in declared order
    from tidegate.core.events.views import ViewReader
    vec = ViewReader(d.sections["server"]["data_dir"], VIEWS).vector("anonymous", "u1", ["spend", "clicks", "last_page"])
    assert vec.dtype.name == "float32" and vec[0] == 30.5 and vec[1] == 4 and vec[2] != vec[2]  # NaN: not numeric


def test_admin_log_and_a_corrupt_partition_is_refused_then_repaired(daemon_factory):
    d = daemon_factory(workers=1)
    assert post_events(d, json.dumps([{"key": "a", "type": "t", "payload": {"i": i}} for i in range(3)]).encode()).status == 202
    assert post_events(d, b'{"key": "b", "type": "t"}').status == 202  # a second block
    stats = d.admin_json("log", "stats")
    assert stats[0]["events"] == 4 and stats[0]["problem"] is None
    tail = d.admin_json("log", "tail", "--key", "a", "-n", "2")
    assert [r["payload"]["i"] for r in tail] == [1, 2]
    d.stop()
    part = os.path.join(d.sections["server"]["data_dir"], "events", "p-0")
    first = sorted(os.listdir(part))[0]
    with open(os.path.join(part, first), "r+b") as f:  # damage the first block: a good one follows it
        f.seek(40)
        f.write(b"\xff\xff\xff")
    d2 = daemon_factory(workers=1, server={"data_dir": d.sections["server"]["data_dir"]})
    r = post_events(d2, b'{"key": "a", "type": "t"}')
    assert r.status == 503 and "admin log repair" in r.json()["error"]["message"]
    assert any(e.get("event") == "event log partition refused" and "offset 0" in e.get("error", "")
               for e in d2.events())
    r = d2.admin("--json", "log", "stats")
    assert r.returncode == 1 and json.loads(r.stdout)[0]["problem"].startswith("corrupt event log block")
    assert d2.admin_json("log", "repair")[0]["bytes_cut"] > 0
    assert d2.admin_json("reload")["ok"]
    assert post_events(d2, b'{"key": "a", "type": "t"}').status == 202
