# cython: language_level=3, boundscheck=False, wraparound=False
"""The append-only event log's hot path: records into a buffer, sealed into checksummed
(optionally LZ4-compressed) blocks, written with one write + fdatasync per block.

On disk a segment is a sequence of blocks:

    block  = magic "TGB1" | body_len u32 | raw_len u32 | codec u8 | n_records u32 | first_seq u64
             | crc32c(body) u32 | body
    body   = the records, LZ4 block-compressed when that saves space (codec 1), else raw (codec 0)
    record = len u32 | crc32c(payload) u32 | payload

Group commit is two steps so the event loop never waits on the disk: `seal()` (loop thread:
takes what was appended since the last seal and frames it as one block) and `write_block()`
(a writer thread: one os.write and one fdatasync; the GIL is released meanwhile). A block is
acknowledged only after its fdatasync returned. A failed write truncates the segment back to
where the block began, so a retry can never leave a torn block in the middle of a segment.
"""
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

import os
import struct

import lz4.block

MAGIC = b"TGB1"
HEADER = struct.Struct("<4sIIBIQI")  # magic, body_len, raw_len, codec, n_records, first_seq, crc
CODEC_RAW, CODEC_LZ4 = 0, 1

cdef extern from "crc32c.h":
    void tg_crc_init()
    uint32_t tg_crc32c(const unsigned char* p, size_t n, uint32_t crc) nogil

tg_crc_init()


cdef inline uint32_t _crc(const unsigned char* p, Py_ssize_t n, uint32_t crc) nogil:
    return tg_crc32c(p, n, crc)


def crc32c(const unsigned char[::1] data, uint32_t crc=0):
    """CRC-32C (Castagnoli) of data."""
    if data.shape[0] == 0:
        return crc
    return _crc(&data[0], data.shape[0], crc)


cdef class LogWriter:
    """Appends records for one partition. Not thread-safe by itself: append/seal on the loop
    thread, write_block on one writer thread, never two write_blocks at once."""
    cdef char* buf
    cdef Py_ssize_t used, cap
    cdef public uint64_t next_seq, first_unsealed
    cdef public Py_ssize_t n_unsealed
    cdef public object directory, path
    cdef public Py_ssize_t segment_bytes, size
    cdef public bint compress
    cdef public object sync  # fdatasync; tests put a failpoint around it
    cdef int fd

    def __init__(self, directory, uint64_t next_seq, Py_ssize_t segment_bytes=64 << 20, bint compress=True):
        self.directory, self.segment_bytes, self.compress = directory, segment_bytes, compress
        self.buf, self.used, self.cap = NULL, 0, 0
        self.next_seq = self.first_unsealed = next_seq
        self.n_unsealed = 0
        self.fd = -1
        self.sync = os.fdatasync
        self._open_segment()

    def _open_segment(self, bint fresh=False):
        """Append to the newest segment, or start one named by the next sequence number (fresh:
        always a new file, after a disk error made the current one's page cache untrustworthy)."""
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(".log"))
        last = names[len(names) - 1] if names else None  # (no negative indexes: wraparound is off)
        if not fresh and last and os.path.getsize(os.path.join(self.directory, last)) < self.segment_bytes:
            path = os.path.join(self.directory, last)
        else:
            path = os.path.join(self.directory, "%020d.log" % self.next_seq)
        # the new segment is open and its name durable before the old descriptor is let go: a
        # failure at any step leaves the writer on the old segment, never on a closed descriptor
        # (whose number the next open() may give an unrelated file)
        new = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(new).st_size
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)  # the new file's name is durable too
            finally:
                os.close(dfd)
        except BaseException:
            os.close(new)
            raise
        old, self.fd, self.path, self.size = self.fd, new, path, size
        if old >= 0:
            try:
                os.close(old)
            except OSError:
                pass  # (its blocks were synced when written)

    def __dealloc__(self):
        free(self.buf)

    cdef int _reserve(self, Py_ssize_t more) except -1:
        cdef Py_ssize_t cap = self.cap or 65536
        cdef char* p
        if self.used + more <= self.cap:
            return 0
        while cap < self.used + more:
            cap *= 2
        p = <char*>realloc(self.buf, cap)
        if p == NULL:
            raise MemoryError()
        self.buf, self.cap = p, cap
        return 0

    cdef inline void _put(self, const char* data, Py_ssize_t n):
        cdef uint32_t head[2]
        head[0] = <uint32_t>n
        head[1] = _crc(<const unsigned char*>data, n, 0)
        memcpy(self.buf + self.used, head, 8)
        memcpy(self.buf + self.used + 8, data, n)
        self.used += 8 + n

    def append(self, bytes payload):
        """Buffer one record; returns its sequence number."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        self._reserve(8 + n)
        self._put(PyBytes_AS_STRING(payload), n)
        self.n_unsealed += 1
        self.next_seq += 1
        return self.next_seq - 1

    def append_many(self, list payloads):
        """Buffer several records; returns the first one's sequence number."""
        cdef Py_ssize_t total = 0
        cdef bytes p
        for p in payloads:
            total += 8 + PyBytes_GET_SIZE(p)
        self._reserve(total)
        for p in payloads:
            self._put(PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p))
        first = self.next_seq
        self.n_unsealed += len(payloads)
        self.next_seq += len(payloads)
        return first

    @property
    def pending_bytes(self):
        return self.used

    def seal(self):
        """The records appended since the last seal as one block: (block bytes, n, first_seq),
        or None when there are none."""
        if not self.n_unsealed:
            return None
        raw = PyBytes_FromStringAndSize(self.buf, self.used)
        codec, body = CODEC_RAW, raw
        if self.compress and len(raw) > 256:
            packed = lz4.block.compress(raw, store_size=False)
            if len(packed) < len(raw):
                codec, body = CODEC_LZ4, packed
        cdef uint32_t c = _crc(<const unsigned char*>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), 0)
        block = HEADER.pack(MAGIC, len(body), len(raw), codec, self.n_unsealed, self.first_unsealed, c) + body
        out = (block, self.n_unsealed, self.first_unsealed)
        self.used = 0
        self.first_unsealed = self.next_seq
        self.n_unsealed = 0
        return out

    def write_block(self, bytes block):
        """One write + fdatasync (call from the writer thread). On any error the segment is cut
        back to where this block began and the error is raised: nothing half-written stays."""
        if self.fd < 0:
            raise OSError(9, "event log segment is not open")
        if self.size >= self.segment_bytes:  # the roll after the last block failed: again, before any byte
            self._open_segment()
        start = self.size
        try:
            view = memoryview(block)
            while view:
                done = os.write(self.fd, view)
                view = view[done:]
            self.sync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, start)
                os.fdatasync(self.fd)
            except OSError as cut:  # the refused block may still be in the file: recovery cuts it
                raise OSError(cut.errno, f"{cut.strerror} (cutting {self.path} back to {start} failed too)")
            raise
        self.size = start + len(block)
        if self.size >= self.segment_bytes:
            try:
                self._open_segment()
            except OSError:
                pass  # this block is durable and answered so; the roll is tried again before the next

    def reopen_fresh(self):
        """After a write error: continue in a new segment file (Linux reports a writeback error
        once, and after a failed fsync the old file's cached pages prove nothing)."""
        self._open_segment(True)

    def write_empty_block(self):
        """A valid block of no records, written and synced: the probe that the disk works again."""
        self.write_block(HEADER.pack(MAGIC, 0, 0, CODEC_RAW, 0, self.next_seq, 0))

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
