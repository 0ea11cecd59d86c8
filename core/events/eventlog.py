"""Event-log partitions: recovery, reading, and group commit around the Cython writer.

A partition is a directory of segment files (`ext/logwriter.pyx` describes the format) owned by
one ingress worker: the ring owner of the event keys it holds, so each key's events are in order
in one place. Appends from one event-loop turn (and from the time the previous fsync took) go
out as one block: `seal()` on the loop, write + fdatasync on the partition's writer thread, then
every waiting request is acknowledged (redis's AE_BARRIER idea: reply after the group fsync).
A flush starts when the buffer reaches `batch_bytes` or `window` seconds after the first
unflushed append. On a disk error (EIO, ENOSPC…) the partition stops acknowledging: the requests
of that block fail (503) and later ones fail at once, until a probe write + fsync succeeds.

Recovery at start reads the tail segment (earlier ones were checked when they were the tail, so
start-up does not grow with the log): a bad block with nothing valid after it is a partial
write and is cut off; a bad block followed by good ones refuses to open the partition
(CorruptLog names the file and offset) until `tidegate admin log repair` cuts that segment at
the bad block (the segments after it are kept).
"""
from __future__ import annotations

import asyncio
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import lz4.block
import orjson

from tidegate.core.base.filelock import StoreLock
from tidegate.core.base.jsonlog import log
from tidegate.ext.logwriter import CODEC_LZ4, HEADER, MAGIC, LogWriter, crc32c

_REC = struct.Struct("<II")


class CorruptLog(Exception):
    def __init__(self, path: str, offset: int, why: str):
        super().__init__(f"corrupt event log block in {path} at offset {offset}: {why}")
        self.path, self.offset = path, offset


class LogUnavailable(Exception):
    """The partition is not acknowledging (a disk error); the client should retry later."""


def segments(directory: str) -> list[str]:
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if n.endswith(".log")]


def read_blocks(path: str, start: int = 0, end: int | None = None):
    """Yield (offset, end, first_seq, [payload, ...]) for each good block from start; raise
    CorruptLog(path, offset) at the first bad one (the caller decides whether it is a torn tail)."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read() if end is None else f.read(max(0, end - start))
    pos = 0
    while pos < len(data):
        off = start + pos
        if len(data) - pos < HEADER.size:
            raise CorruptLog(path, off, "truncated block header")
        magic, body_len, raw_len, codec, n, first_seq, crc = HEADER.unpack_from(data, pos)
        if magic != MAGIC:
            raise CorruptLog(path, off, "bad magic")
        body = data[pos + HEADER.size: pos + HEADER.size + body_len]
        if len(body) != body_len:
            raise CorruptLog(path, off, "truncated block")
        if crc32c(body) != crc:
            raise CorruptLog(path, off, "block checksum mismatch")
        raw = lz4.block.decompress(body, uncompressed_size=raw_len) if codec == CODEC_LZ4 else body
        records, rp = [], 0
        for _ in range(n):
            length, rcrc = _REC.unpack_from(raw, rp)
            payload = raw[rp + 8: rp + 8 + length]
            if crc32c(payload) != rcrc:
                raise CorruptLog(path, off, "record checksum mismatch")
            records.append(payload)
            rp += 8 + length
        pos += HEADER.size + body_len
        yield off, start + pos, first_seq, records


DURABLE = "durable"  # [segment, offset]: the log is fsynced up to here (what the view builder may read)
FAILPOINTS = dict(f.partition("=")[::2] for f in os.environ.get("TIDEGATE_FAILPOINTS", "").split(",") if f)


def read_durable(directory: str) -> tuple[str, int] | None:
    """How far the partition is known to be on disk; None when it has never said (read it all)."""
    try:
        with open(os.path.join(directory, DURABLE), "rb") as f:
            seg, off = orjson.loads(f.read())
        return seg, off
    except (OSError, ValueError, TypeError):
        return None


def _write_durable(directory: str, segment: str, offset: int) -> None:
    tmp = os.path.join(directory, DURABLE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(orjson.dumps([os.path.basename(segment), offset]))
    os.replace(tmp, os.path.join(directory, DURABLE))  # readers see the old mark or the new, whole


def _apply_cuts(directory: str) -> None:
    """A block refused after a disk error whose cut-back also failed left SEGMENT.cut naming the
    good length: cut there now, so an event answered 503 can never surface later."""
    for name in os.listdir(directory):
        if name.endswith(".log.cut"):
            cut, seg = os.path.join(directory, name), os.path.join(directory, name[:-4])
            with open(cut) as f:
                good = int(f.read().strip() or 0)
            if os.path.exists(seg) and os.path.getsize(seg) > good:
                with open(seg, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
            os.unlink(cut)


def recover(directory: str, repair: bool = False) -> int:
    """Check the tail segment (the only one a crash can have left half-written; earlier ones
    were checked when they were the tail, so start-up does not grow with the log); cut a torn
    last block; return the next sequence number. A bad block before the end raises CorruptLog,
    unless repair, which cuts the segment there."""
    _apply_cuts(directory)
    segs = segments(directory)
    if not segs:
        return 0
    path = segs[len(segs) - 1]
    next_seq = int(os.path.basename(path)[:-4])  # a segment is named by its first sequence number
    try:
        for _, _, first_seq, records in read_blocks(path):
            next_seq = first_seq + len(records)
    except CorruptLog as e:
        if not repair and _good_block_after(path, e.offset):
            raise  # damage in the middle: not a torn write
        with open(path, "r+b") as f:
            f.truncate(e.offset)
            os.fsync(f.fileno())
    with open(path, "rb+") as f:  # what a crashed process left in the page cache is durable from here on
        os.fsync(f.fileno())
    _write_durable(directory, path, os.path.getsize(path))
    return next_seq


def _good_block_after(path: str, offset: int) -> bool:
    """Is there a valid block header after offset? (Then the damage is not just a torn tail.)"""
    with open(path, "rb") as f:
        f.seek(offset + 1)
        data = f.read()
    i = data.find(MAGIC)
    while i >= 0:
        try:
            next(read_blocks(path, offset + 1 + i))
            return True
        except (CorruptLog, StopIteration, struct.error):
            i = data.find(MAGIC, i + 1)
    return False


def read_all(directory: str):
    """Yield (seq, payload) for every record, in order."""
    for path in segments(directory):
        for _, _, first_seq, records in read_blocks(path):
            for i, payload in enumerate(records):
                yield first_seq + i, payload


class Partition:
    """The owner side of one partition: group commit with acknowledgement after fsync."""

    def __init__(self, directory: str, batch_bytes: int = 1 << 20, window: float = 0.002,
                 segment_bytes: int = 64 << 20, compress: bool = True, lock: StoreLock | None = None):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory, self.batch_bytes, self.window = directory, batch_bytes, window
        self.lock = lock or StoreLock(directory).acquire()  # one writer: a second one fails here
        try:
            self.writer = LogWriter(directory, recover(directory), segment_bytes, compress)
        except BaseException:
            self.lock.release()  # a corrupt partition stays shut, but `admin log repair` may open it
            raise
        if "log.fsync_delay" in FAILPOINTS:  # tests: prove that no acknowledgement overtakes the fsync
            delay = float(FAILPOINTS["log.fsync_delay"])
            self.writer.sync = lambda fd: (time.sleep(delay), os.fdatasync(fd))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="eventlog-writer")
        self.loop = None
        self.waiting: list[asyncio.Future] = []  # resolved when the records appended so far are durable
        self.flushing = False
        self.timer = None
        self.failed: str | None = None  # the disk error that stopped acknowledgements
        self.stats = {"events_appended": 0, "log_blocks": 0, "log_bytes": 0, "log_write_errors": 0}

    def append(self, payloads: list[bytes], buffered: bool = False):
        """Append records; returns a future of their first sequence number, resolved after the
        fsync that covers them (or at once when buffered). Raises LogUnavailable while failed."""
        if self.failed:
            raise LogUnavailable(self.failed)
        self.loop = self.loop or asyncio.get_running_loop()
        first = self.writer.append_many(payloads)
        self.stats["events_appended"] += len(payloads)
        fut = self.loop.create_future()
        if buffered:
            fut.set_result(first)
        else:
            self.waiting.append((fut, first))
        self._schedule()
        return fut

    def _schedule(self) -> None:
        if self.flushing:
            return  # the next block goes out when this fsync returns
        if self.writer.pending_bytes >= self.batch_bytes:
            self._flush()
        elif self.timer is None:
            self.timer = self.loop.call_later(self.window, self._flush)

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        sealed = self.writer.seal()
        if sealed is None:
            return
        block = sealed[0]
        waiters, self.waiting = self.waiting, []
        self.flushing = True
        fut = self.loop.run_in_executor(self.pool, self._write, block)
        fut.add_done_callback(lambda f: self._written(f, waiters, len(block)))

    def _write(self, block: bytes) -> None:
        """Writer thread: one write + fdatasync, then the durable mark moves past the block."""
        w = self.writer
        try:
            w.write_block(block)
        except OSError:
            self._record_cut(w.path, w.size)
            raise
        self._mark(w.path, w.size)

    def _mark(self, path: str, size: int) -> None:
        """Move the durable mark; the block is durable already, so failing here (a full disk)
        only holds the view builder back until a later mark lands: never fail the block for it."""
        try:
            _write_durable(self.directory, path, size)
        except OSError as e:
            log.warning("event log durable mark not updated", partition=self.directory, error=str(e))

    def _record_cut(self, path: str, good: int) -> None:
        try:
            with open(path + ".cut", "w") as f:
                f.write(str(good))
                os.fsync(f.fileno())
        except OSError as e:
            log.error("event log could not record where to cut a refused block", file=path, error=str(e))

    def _written(self, f, waiters, nbytes: int) -> None:
        self.flushing = False
        err = f.exception()
        if err is None:
            self.stats["log_blocks"] += 1
            self.stats["log_bytes"] += nbytes
            for w, first in waiters:
                if not w.done():
                    w.set_result(first)
        else:
            self.stats["log_write_errors"] += 1
            self.failed = f"event log write failed: {err}"
            log.error("event log partition stopped acknowledging", partition=self.directory, error=str(err))
            self.writer.seal()  # what was appended meanwhile is refused too: never retry-then-ack
            waiters, self.waiting = waiters + self.waiting, []
            for w, _ in waiters:
                if not w.done():
                    w.set_exception(LogUnavailable(self.failed))
        if self.writer.pending_bytes and not self.failed:
            self._flush()

    def retain(self, max_bytes: int, max_age: float, applied_before: str | None) -> list[str]:
        """Delete the oldest closed segments beyond max_bytes or older than max_age, but never
        one the view builder has not finished (applied_before: the segment it is reading; None
        when there are no views). Returns the deleted paths."""
        segs = segments(self.directory)[:-1]  # the newest one is being written
        total = sum(os.path.getsize(p) for p in segments(self.directory))
        deleted, now = [], time.time()
        for path in segs:
            too_big = max_bytes and total > max_bytes
            too_old = max_age and now - os.path.getmtime(path) > max_age
            if not (too_big or too_old):
                break
            if applied_before is not None and os.path.basename(path) >= applied_before:
                break  # the views still need it
            total -= os.path.getsize(path)
            os.unlink(path)
            deleted.append(path)
        return deleted

    def probe(self) -> bool:
        """While failed: write and fsync a real (empty) block into a fresh segment; resume when
        that works. Zero bytes would prove nothing, and after a failed fsync the old segment's
        cached pages cannot be trusted (PostgreSQL's "fsyncgate"), so nothing more goes there."""
        if not self.failed:
            return True
        try:
            self.writer.reopen_fresh()
            self._write_probe()
        except OSError as e:
            log.warning("event log partition still failing", partition=self.directory, error=str(e))
            return False
        self.failed = None
        log.warning("event log partition acknowledging again", partition=self.directory)
        return True

    def _write_probe(self) -> None:
        w = self.writer
        try:
            w.write_empty_block()
        except OSError:
            self._record_cut(w.path, w.size)
            raise
        self._mark(w.path, w.size)

    def close(self) -> None:
        """Finish the write in flight, write what is still buffered and answer its waiters, then
        let go of the partition (a hand-off: the next owner opens it after this returns)."""
        self.pool.shutdown(wait=True)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        sealed = None if self.failed else self.writer.seal()
        waiters, self.waiting = self.waiting, []
        err = None
        if sealed is not None:
            try:
                self._write(sealed[0])
            except OSError as e:
                err = e
        for w, first in waiters:
            if not w.done():
                if err is None and not self.failed:
                    w.set_result(first)
                else:
                    w.set_exception(LogUnavailable(f"event log closed: {err or self.failed}"))
        self.writer.close()
        self.lock.release()
