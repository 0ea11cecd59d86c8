"""An ingress worker's durable stores: its slot's sessions and event-log partition.

Each store has exactly one writer at any instant, its file lock's holder. On boot the stores are
opened once the previous holder let go (the old generation, on a reload); meanwhile owner calls
for them wait (Owners.hold) instead of failing. On a reload's RELEASE they are flushed, fsynced
and closed, and owner calls still made here go to the next generation; on RESUME (the reload
failed) they are taken back. After the worker count changed, `rehome_sessions` moves each
session to its owner on the new ring.
"""
from __future__ import annotations

import asyncio
import glob
import os
import time

import lmdb

from tidegate.core.base.filelock import StoreLock, StoreLocked
from tidegate.core.base.jsonlog import log
from tidegate.core.events.owner import PartitionOwner
from tidegate.core.messaging import protocol
from tidegate.core.messaging.mesh import Mesh
from tidegate.core.state.sessions import SessionStore

# the owner ops these stores answer: they wait while a store is being opened or handed over
STORE_OPS = (protocol.SESS_CREATE, protocol.SESS_GET, protocol.SESS_PATCH, protocol.SESS_DELETE,
             protocol.SESS_ADOPT, protocol.EV_APPEND)


class Stores:
    def __init__(self, cfg: dict, slot: int, n_slots: int, owners, views):
        self.cfg, self.slot, self.n_slots = cfg, slot, n_slots
        self.owners, self.views = owners, views
        self.sessions: SessionStore | None = None
        self.events: PartitionOwner | None = None  # this worker's event-log partition
        self._event_stats: dict = {}  # kept while released, so counters never go back
        self._expiring = False  # an expiry sweep is running

    def dirs(self) -> dict:
        data = self.cfg["server"]["data_dir"]
        dirs = {"sessions": os.path.join(data, f"sessions-{self.slot}")}
        if self.cfg["events"]["enabled"]:
            dirs["events"] = os.path.join(data, "events", f"p-{self.slot}")
        return dirs

    def hold(self) -> None:
        """Until open() runs, owner calls for the stores wait instead of failing."""
        self.owners.hold(STORE_OPS)

    async def open(self, wait: float) -> None:
        """Take this slot's stores once the previous holder has let go: poll their locks without
        blocking the loop, then open them and answer the owner calls that waited."""
        dirs = self.dirs()
        locks = {name: StoreLock(d) for name, d in dirs.items()}
        deadline = time.monotonic() + wait
        while not all(lock.try_acquire() for lock in locks.values()):
            if time.monotonic() > deadline:
                for lock in locks.values():
                    lock.release()
                raise StoreLocked(f"slot {self.slot}'s stores are still held: "
                                  + ", ".join(f"{n} by {lk.holder()}" for n, lk in locks.items() if not lk.held))
            await asyncio.sleep(0.005)
        self.sessions = self._session_store(dirs["sessions"], locks["sessions"])
        handlers = self.sessions.handlers()
        if "events" in locks:
            self.events = PartitionOwner(self.cfg, self.slot, self.views, lock=locks["events"])
            handlers.update(self.events.handlers())
        self.owners.open(handlers)

    def close(self) -> None:
        """Flush, fsync and close the stores, then let go of their locks (idempotent)."""
        self.hold()
        if self.events is not None:
            self._event_stats = self.events.stats
            self.events.close()
            self.events = None
        if self.sessions is not None:
            self.sessions.close()
            self.sessions = None

    def release(self, gen: int, ctx) -> None:
        """Reload hand-off: generation `gen` is up to its stores. Close them, and send every
        owner call still made here (requests in flight) to generation gen: no error, a short wait."""
        self.close()
        srv = self.cfg["server"]
        forward = Mesh(-1, self.n_slots, srv["run_dir"], {}, srv["max_frame_bytes"], ctx=ctx, gen=gen, bind=False)
        forward.start()
        self.owners.redirect(forward, STORE_OPS)

    async def resume(self) -> None:
        """The reload failed after the release: take the stores back."""
        self.owners.restore(STORE_OPS)
        await self.open(self.cfg["server"]["boot_timeout"])

    def counters(self) -> dict:
        if self.events is not None:
            self._event_stats = self.events.stats
        return dict(self._event_stats, sessions_live=len(self.sessions.live) if self.sessions else 0)

    # periodic upkeep
    def expire_sessions(self) -> None:
        if self.sessions is not None and not self._expiring:
            self._expiring = True
            asyncio.ensure_future(self._expire_in_batches())

    async def _expire_in_batches(self) -> None:
        """Expired sessions go in batches of sessions.expire_batch, the loop serving between them."""
        try:
            while self.sessions is not None and \
                    self.sessions.expire(self.cfg["sessions"]["expire_batch"]) >= self.cfg["sessions"]["expire_batch"]:
                await asyncio.sleep(0)
        finally:
            self._expiring = False

    def retain_events(self) -> None:
        if self.events is not None:
            self.events.retain()

    def probe_events(self) -> None:
        if self.events is not None:
            self.events.probe()

    def _session_store(self, path: str, lock: StoreLock, max_sessions: int | None = None) -> SessionStore:
        sc = self.cfg["sessions"]
        return SessionStore(path, sc["ttl"], max_sessions or sc["max_per_worker"], sc["map_bytes"],
                            sc["max_attributes_bytes"], lock=lock,
                            max_per_key=sc["max_per_key"] if max_sessions is None else 1 << 62)

    async def rehome_sessions(self) -> None:
        """After the worker count changed, sessions sit at their old owner: hand each to its owner
        on the new ring (sess.adopt), then drop it here. Slot 0 also empties the stores of slots
        that no longer exist. Until a session is moved its token answers 401; a failure leaves it
        for the next start. Nothing is scanned while the worker count stays what it was."""
        data = self.cfg["server"]["data_dir"]
        mark = os.path.join(self.dirs()["sessions"], "ring")  # the worker count the store was sorted for
        try:
            with open(mark) as f:
                if f.read().strip() == str(self.n_slots):
                    return
        except OSError:
            pass
        stores, complete = [(self.sessions, False)], True
        if self.slot == 0:
            for path in sorted(glob.glob(os.path.join(data, "sessions-*"))):
                j = path.rsplit("-", 1)[1]
                if j.isdigit() and int(j) >= self.n_slots:
                    try:
                        lock = StoreLock(path).acquire(wait=30.0)  # its old owner lets go on its way out
                        stores.append((self._session_store(path, lock, max_sessions=1 << 62), True))
                    except (OSError, lmdb.Error) as e:
                        complete = False
                        log.warning("sessions of a removed slot not moved yet", store=path, error=str(e))
        moved = 0
        for store, foreign in stores:
            for i, (sid, rec) in enumerate(list(store.live.items())):
                if i % 1000 == 999:
                    await asyncio.sleep(0)  # a big store: keep serving meanwhile
                owner = self.owners.owner_of(sid.encode())
                if not foreign and owner == self.slot:
                    continue
                try:
                    ok = self.owners.call(owner, protocol.SESS_ADOPT, {"sid": sid, "rec": rec}, 5.0)
                    if asyncio.isfuture(ok):
                        ok = await ok
                except Exception as e:
                    complete = False
                    log.warning("session not moved yet", error=repr(e))
                    break
                if ok:
                    store.delete(sid)
                    moved += 1
                await asyncio.sleep(0)
            if foreign:
                store.close()
        if moved:
            log.info("sessions moved to their owners on the new ring", moved=moved)
        if complete and self.sessions is not None:
            with open(mark, "w") as f:
                f.write(str(self.n_slots))
