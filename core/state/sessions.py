"""Sessions, held by the ring owner of their token and written through to LMDB.

A session token is `tgs-` + 32 random bytes (base64url, 256 bits). Only its SHA-256 is ever
stored or sent between processes, so neither the disk nor the mesh holds a usable token. The
owner keeps every live session in memory and writes each change (create, attributes, delete)
through to its own LMDB environment (`DATA_DIR/sessions-SLOT`) before it answers, so an
acknowledged change survives a SIGKILL: a respawned owner reloads the environment on start.

Expiry slides: each authenticated use pushes `expires_at` to now + ttl. Those touches are
persisted at most every ttl/10 per session (a crash can shorten a session by that much at
worst), which keeps disk writes off the hot path.
"""
from __future__ import annotations

import base64
import hashlib
import os
import time

import lmdb
import orjson

from tidegate.core.base.filelock import StoreLock
from tidegate.core.messaging.protocol import SESS_ADOPT, SESS_CREATE, SESS_DELETE, SESS_GET, SESS_PATCH

PREFIX = b"tgs-"
TOO_LARGE, FULL, KEY_FULL = "too_large", "full", "key_full"  # what an op answers instead of the record


def new_token() -> bytes:
    return PREFIX + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=")


def token_id(token: bytes) -> str:
    """What identifies a session everywhere but in the client's hands."""
    return hashlib.sha256(token).hexdigest()


def new_record(tenant: str, user: str, key_id: str, klass: str, attributes: dict, ttl: float) -> dict:
    """A new session's record (the shape every backend stores and answers)."""
    now = time.time()
    return {"tenant": tenant, "user": user, "key_id": key_id, "class": klass, "created_at": now,
            "last_seen": now, "expires_at": now + ttl, "attributes": attributes}


def merge_attributes(current: dict, patch: dict, max_bytes: int) -> dict:
    """A PATCH applied to attributes (null removes a key); ValueError past max_bytes of JSON."""
    merged = dict(current)
    for k, v in patch.items():
        if v is None:
            merged.pop(k, None)
        else:
            merged[k] = v
    if len(orjson.dumps(merged)) > max_bytes:
        raise ValueError(f"attributes would exceed {max_bytes} bytes")
    return merged


class SessionsFull(Exception):
    """The store reached sessions.map_bytes: creating or patching answers 503."""


class SessionStore:
    def __init__(self, path: str, ttl: float, max_sessions: int, max_map_bytes: int = 4 << 30,
                 max_attributes_bytes: int = 4096, lock: StoreLock | None = None, max_per_key: int = 1 << 62):
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.lock = lock or StoreLock(path).acquire()  # one writer: a second one fails here
        self.ttl, self.max_sessions, self.max_attributes = ttl, max_sessions, max_attributes_bytes
        self.max_map = max_map_bytes
        size = max(os.path.getsize(os.path.join(path, "data.mdb")) if os.path.exists(os.path.join(path, "data.mdb"))
                   else 0, min(64 << 20, max_map_bytes))
        self.env = lmdb.open(path, map_size=size, subdir=True, max_dbs=1, lock=True)
        self.live: dict[str, dict] = {}
        self._persisted_expiry: dict[str, float] = {}
        self.max_per_key, self.per_key = max_per_key, {}  # key_id -> sessions held here
        self._load()

    def handlers(self) -> dict:
        """The owner-side ops (core/state/owners.py): one JSON-able payload each."""
        return {SESS_CREATE: self._create_op, SESS_GET: self.get, SESS_PATCH: self._patch_op, SESS_DELETE: self.delete,
                SESS_ADOPT: self._adopt_op}

    def _adopt_op(self, p: dict) -> bool:
        """Take over a session from its previous owner (the ring changed); the newer copy wins."""
        mine = self.live.get(p["sid"])
        if mine is None or mine["last_seen"] < p["rec"]["last_seen"]:
            self._write(p["sid"], p["rec"])
            if mine is None:
                self._count(p["rec"], 1)
            self.live[p["sid"]] = p["rec"]
            self._persisted_expiry[p["sid"]] = p["rec"]["expires_at"]
        return True

    def _create_op(self, p: dict):
        if self.per_key.get(p["key_id"], 0) >= self.max_per_key:
            return KEY_FULL  # the asker answers 429: this key's share is taken, not the store
        try:
            return self.create(p["sid"], p["tenant"], p["user"], p["key_id"], p["class"], p["attributes"])
        except (OverflowError, SessionsFull):
            return None  # full: the asker answers 503

    def _patch_op(self, p: dict):
        try:
            return self.patch(p["sid"], p["attributes"])
        except ValueError:
            return TOO_LARGE
        except SessionsFull:
            return FULL

    def _load(self) -> None:
        now, dead = time.time(), []
        with self.env.begin() as txn:
            for key, value in txn.cursor():
                rec = orjson.loads(value)
                if rec["expires_at"] <= now:
                    dead.append(key)
                else:
                    self.live[key.decode()] = rec
                    self._persisted_expiry[key.decode()] = rec["expires_at"]
                    self._count(rec, 1)
        if dead:
            with self.env.begin(write=True) as txn:
                for key in dead:
                    txn.delete(key)

    def _write(self, sid: str, rec: dict | None) -> None:
        """Write through and sync; a full map doubles up to max_map_bytes, then SessionsFull."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    if rec is None:
                        txn.delete(sid.encode())
                    else:
                        txn.put(sid.encode(), orjson.dumps(rec))
                break
            except lmdb.MapFullError:
                size = self.env.info()["map_size"]
                if size >= self.max_map:
                    raise SessionsFull(f"sessions store reached {self.max_map} bytes") from None
                self.env.set_mapsize(min(self.max_map, size * 2))
        self.env.sync(True)

    # ---- operations (called by the owner only) ------------------------------------------------
    def create(self, sid: str, tenant: str, user: str, key_id: str, klass: str, attributes: dict) -> dict:
        if len(self.live) >= self.max_sessions:
            self.expire()
            if len(self.live) >= self.max_sessions:
                raise OverflowError(f"this worker holds the maximum of {self.max_sessions} sessions")
        rec = new_record(tenant, user, key_id, klass, attributes, self.ttl)
        self._write(sid, rec)
        if sid not in self.live:
            self._count(rec, 1)
        self.live[sid] = rec
        self._persisted_expiry[sid] = rec["expires_at"]
        return rec

    def get(self, sid: str, touch: bool = True) -> dict | None:
        rec = self.live.get(sid)
        now = time.time()
        if rec is None or rec["expires_at"] <= now:
            # an expired session is removed by the periodic expire() sweep, not here: answering
            # an expired token must cost what answering an unknown one costs (no disk write)
            return None
        if touch:
            rec["last_seen"], rec["expires_at"] = now, now + self.ttl
            if rec["expires_at"] - self._persisted_expiry.get(sid, 0) > self.ttl / 10:
                try:
                    self._write(sid, rec)
                    self._persisted_expiry[sid] = rec["expires_at"]
                except SessionsFull:
                    pass  # a touch is best effort: the session still works, its expiry persists later
        return rec

    def patch(self, sid: str, attributes: dict) -> dict | None:
        rec = self.get(sid)
        if rec is None:
            return None
        rec = dict(rec, attributes=merge_attributes(rec["attributes"], attributes, self.max_attributes))
        self._write(sid, rec)
        self.live[sid] = rec
        return rec

    def _count(self, rec: dict, n: int) -> None:
        k = rec.get("key_id", "")
        left = self.per_key.get(k, 0) + n
        if left > 0:
            self.per_key[k] = left
        else:
            self.per_key.pop(k, None)

    def delete(self, sid: str) -> bool:
        rec = self.live.pop(sid, None)
        existed = rec is not None
        if existed:
            self._count(rec, -1)
        self._persisted_expiry.pop(sid, None)
        self._write(sid, None)
        return existed

    def expire(self, limit: int | None = None) -> int:
        """Remove expired sessions, at most `limit` of them (None: all), in one transaction and
        without a sync of its own: sessions created together expire together, and one commit and
        fsync each (~1 ms) stalled the worker past worker_timeout at ~30,000. A crash that loses
        these deletions loses nothing: an expired record is dropped again when the store loads."""
        now = time.time()
        dead = []
        for sid, rec in self.live.items():
            if rec["expires_at"] <= now:
                dead.append(sid)
                if limit is not None and len(dead) >= limit:
                    break
        if not dead:
            return 0
        for sid in dead:
            self._count(self.live.pop(sid), -1)
            self._persisted_expiry.pop(sid, None)
        with self.env.begin(write=True) as txn:  # (deletes only shrink the map: never MapFull)
            for sid in dead:
                txn.delete(sid.encode())
        return len(dead)

    def close(self) -> None:
        self.env.close()
        self.lock.release()
