"""Faults under load against the real daemon: reloads and SIGKILLs of every process kind while
event writers and a session client run. Every acknowledged event is in the log exactly once and
in order per key, no sequence number repeats inside a partition, every acknowledged session
write is there afterwards, and the daemon keeps serving."""
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
from helpers.keys import ALPHA, KEYS
from tidegate.core.events.eventlog import read_all

TRIALS = int(os.environ.get("TIDEGATE_FAULT_TRIALS", "50"))
RELOADS = int(os.environ.get("TIDEGATE_FAULT_RELOADS", "20"))
AUTH = {"Authorization": f"Bearer {ALPHA}"}


class Load:
    """4 event writers and a session client, recording what the daemon acknowledged."""

    def __init__(self, d):
        self.d, self.stop = d, threading.Event()
        self.acked, self.refused = [], defaultdict(int)
        self.sessions: dict[str, int] = {}  # token -> last acknowledged counter
        self.threads = [threading.Thread(target=self.writer, args=(w,)) for w in range(4)]
        self.threads.append(threading.Thread(target=self.session_client))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()

    def post(self, method, path, body, timeout=10):
        try:
            return request(self.d.port, method, path, json.dumps(body).encode(), headers=AUTH, timeout=timeout)
        except OSError:
            return None

    def writer(self, w):
        n = 0
        while not self.stop.is_set():
            batch = [{"key": f"k{w}-{j}", "type": "t", "payload": {"n": n, "w": w}} for j in range(5)]
            r = self.post("POST", "/v1/events", batch)
            if r is not None and r.status == 202:
                self.acked.extend((b["key"], n) for b in batch)
            else:
                self.refused[_why(r, "events")] += 1
            n += 1

    def session_client(self):
        tokens, i = [], 0
        while not self.stop.is_set():
            i += 1
            if len(tokens) < 8:
                r = self.post("POST", "/v1/sessions", {"user": f"u{i}"})
                if r is not None and r.status == 201:
                    tokens.append(r.json()["token"])
                continue
            token = tokens[i % len(tokens)]
            try:
                r = request(self.d.port, "PATCH", "/v1/sessions/current",
                            json.dumps({"attributes": {"n": i}}).encode(),
                            headers={"Authorization": f"Bearer {token}"}, timeout=10)
            except OSError:
                r = None
            if r is not None and r.status == 200:
                self.sessions[token] = i
            else:
                self.refused[_why(r, "session")] += 1


def _why(r, what: str) -> str:
    """What a refusal was, for the failure message: the route, the status and the error code."""
    if r is None:
        return f"{what} conn"
    try:
        code = r.json()["error"]["code"]
    except Exception:
        code = ""
    return f"{what} {r.status} {code}".strip()


def check_log(d, load: Load) -> None:
    seen, by_key, acked = defaultdict(int), defaultdict(list), set(load.acked)
    for part in sorted(glob.glob(os.path.join(d.sections["server"]["data_dir"], "events", "p-*"))):
        seqs = [s for s, _ in read_all(part)]
        assert len(seqs) == len(set(seqs)), f"{part}: repeated sequence numbers"
        for _, p in read_all(part):
            e = orjson.loads(p)
            seen[(e["key"], e["payload"]["n"])] += 1
            if (e["key"], e["payload"]["n"]) in acked:  # the order promised is that of acknowledged events
                by_key[e["key"]].append(e["payload"]["n"])
    assert len(load.acked) > 100, load.refused
    missing = [a for a in load.acked if seen[a] == 0]
    assert not missing, (len(missing), missing[:5])
    assert all(seen[a] == 1 for a in load.acked), "an acknowledged event was logged twice"
    disorder = {k: ns for k, ns in by_key.items() if ns != sorted(ns)}
    assert not disorder, ("out of order within a key", {k: [n for i, n in enumerate(ns) if i and n < ns[i - 1]][:5]
                                                        for k, ns in list(disorder.items())[:3]})


def check_sessions(d, load: Load) -> None:
    assert load.sessions, load.refused
    for token, n in load.sessions.items():
        r = request(d.port, "GET", "/v1/sessions/current", headers={"Authorization": f"Bearer {token}"})
        assert r.status == 200 and r.json()["attributes"]["n"] >= n, (r.status, r.body, n)


def test_reloads_under_load_lose_and_repeat_nothing(daemon_factory):
    d = daemon_factory(workers=2, auth={"keys": KEYS})
    with Load(d) as load:
        for k in range(RELOADS):
            time.sleep(0.3)
            d.signal(signal.SIGHUP)
            d.wait_event("reloaded", count=k + 1, timeout=30)
        time.sleep(0.3)
    gens = {r["gen"] for r in d.admin_json("workers")["body"]}
    assert gens == {RELOADS + 1}
    check_sessions(d, load)
    d.stop()
    check_log(d, load)
    total = len(load.acked) // 5 + sum(load.refused.values())
    print(f"\nreloads {RELOADS}: {len(load.acked)} events acknowledged, {len(load.sessions)} sessions, "
          f"refused {dict(load.refused)} of {total} requests")
    assert not load.refused, load.refused  # the hand-off is a short wait, never an error


def test_sigkill_of_every_process_kind_loses_nothing(daemon_factory, demo_model):
    views = [{"name": "n", "kind": "count"}]
    d = daemon_factory(workers=2, auth={"keys": KEYS}, events={"views": views},
                       server={"respawn_backoff_max": 0.5, "worker_timeout": 10.0},
                       inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 256,
                                                               "max_seqs": 2}]})
    rnd = random.Random(11)
    kinds = ("ingress-", "inference-", "embedder", "views")
    killed = defaultdict(int)
    with Load(d) as load:
        for _ in range(TRIALS):
            rows = [r for r in d.admin_json("workers")["body"] if r["state"] == "ready"]
            kind = rnd.choice(kinds)
            victims = [r for r in rows if r["id"].startswith(kind)]
            if victims:
                os.kill(rnd.choice(victims)["pid"], signal.SIGKILL)
                killed[kind] += 1
            time.sleep(0.15)
        deadline = time.time() + 30
        while time.time() < deadline and request(d.port, path="/readyz", timeout=5).status != 200:
            time.sleep(0.2)
        time.sleep(0.3)
    print(f"\nkills {dict(killed)}: {len(load.acked)} events acknowledged, refused {dict(load.refused)}")
    assert sum(killed.values()) >= TRIALS // 2, killed
    assert request(d.port, path="/readyz").status == 200  # every kind came back
    check_sessions(d, load)
    d.stop()
    check_log(d, load)
