"""Prompt-prefix cache index: hashed token blocks, three tiers (live KV, RAM, disk).

Why hashed blocks rather than a radix tree: a prompt is cut into blocks of `block` tokens and
block i is named by a hash chained over blocks 0..i (vLLM's scheme). A prefix match is then a
walk down one list of 16-byte names, dictionaries do the lookups, and the same names work for
every tier and in file headers. The price is block granularity: a match ends on a block
boundary (at most block-1 tokens are recomputed).

Tenant safety: the chain is salted with the tenant, so one tenant's blocks never match another's
and nobody can learn by timing what others asked. Prefixes the config declares shared (a common
system prompt) are hashed without salt up to the end of the shared part; the chain mixes the
tenant in from there on.

Tiers (the inference worker moves the bytes; this module only keeps the books):
  1. live: blocks resident in the KV cache: in a sequence slot (running or finished-but-not-
     reused), or parked under a spare sequence id (ParkedTier) when its slot went to another
     prompt; a hit shares the cells (llama_memory_seq_cp: no copy, no compute) or reuses the slot.
  2. RAM: llama_state_seq bytes per entry, LRU bounded by bytes.
  3. disk: the same bytes in files under data_dir with a header (magic, format version, model
     fingerprint, block names, CRC32 of the payload); written behind the request path; a stale,
     corrupt or foreign file is removed when met, never trusted.
"""
from __future__ import annotations

import hashlib
import os
import struct
import threading
import zlib
from array import array
from collections import OrderedDict

from tidegate.core.base.filelock import StoreLock

MAGIC, VERSION = b"TGKV", 1
_HEAD = struct.Struct("<4sI32sIIQI")  # magic, version, fingerprint, block, n_blocks, payload bytes, crc32


def block_names(tokens: list[int], block: int, tenant: str, shared_tokens: int = 0) -> list[bytes]:
    """Chained 16-byte names of the full blocks of tokens."""
    salt = hashlib.blake2b(tenant.encode(), digest_size=16).digest()
    names, h = [], b""
    raw = array("i", tokens).tobytes()
    step = block * 4
    for i in range(len(tokens) // block):
        mix = b"" if (i + 1) * block <= shared_tokens else salt
        h = hashlib.blake2b(h + mix + raw[i * step:(i + 1) * step], digest_size=16).digest()
        names.append(h)
    return names


def common_blocks(a: list[bytes], b: list[bytes]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ParkedTier:
    """Tier 1 past the slots: prefixes kept in the KV cache under spare sequence ids. A slot given
    to a different prompt first parks what its KV holds (its cells gain the park's id, nothing is
    copied), so more prefixes stay live than there are slots, as long as they fit: at most
    len(ids) entries and max_tokens cells, least recently used out first. The batcher does the
    KV operations; this keeps the books: per id, the prompt's block names, the tokens the cells
    hold (prompt and answer, for token-level matching) and their tenant."""

    def __init__(self, ids: list[int], max_tokens: int, block: int):
        self.free, self.max_tokens, self.block = list(ids), max_tokens, block
        self.entries: OrderedDict[int, tuple[list[bytes], list[int], str]] = OrderedDict()  # LRU first
        self.tokens = 0

    def longest(self, names: list[bytes]) -> tuple[int, int]:
        """(blocks of names a parked entry holds, its id), (0, -1) when none."""
        best, pid = 0, -1
        for i, (have, _, _) in self.entries.items():
            n = common_blocks(have, names)
            if n > best:
                best, pid = n, i
        return best, pid

    def held(self, pid: int) -> tuple[list[int], str]:
        """(the tokens park pid's cells hold, their tenant)."""
        _, tokens, tenant = self.entries[pid]
        return tokens, tenant

    def touch(self, pid: int) -> None:
        self.entries.move_to_end(pid)

    def admit(self, names: list[bytes], tokens: list[int], tenant: str) -> tuple[int, list[int]]:
        """(the id to park under, the ids evicted to make room: clear their KV first); (-1, [])
        when it cannot fit or its blocks are held already."""
        n = len(tokens)
        if not names or n > self.max_tokens or not (self.free or self.entries) \
                or self.longest(names)[0] >= len(names):
            return -1, []
        evicted = []
        while not self.free or self.tokens + n > self.max_tokens:
            pid, (_, old, _) = self.entries.popitem(last=False)
            self.tokens -= len(old)
            self.free.append(pid)
            evicted.append(pid)
        pid = self.free.pop()
        self.entries[pid] = (list(names), list(tokens), tenant)
        self.tokens += n
        return pid, evicted


class RamTier:
    """KV bytes per entry, LRU by bytes. An entry is indexed under every block name it covers,
    so any shorter prefix of it matches too."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[bytes, tuple[list[bytes], bytes]] = OrderedDict()  # last name -> (names, data)
        self.index: dict[bytes, bytes] = {}  # block name -> last name of the entry holding it
        self.evictions = 0

    def longest(self, names: list[bytes]) -> tuple[int, bytes | None]:
        """(matched blocks, entry key) for the longest prefix of names held here."""
        for i in range(len(names) - 1, -1, -1):
            key = self.index.get(names[i])
            if key is not None:
                return i + 1, key
        return 0, None

    def get(self, key: bytes) -> bytes:
        self.entries.move_to_end(key)
        return self.entries[key][1]

    def put(self, names: list[bytes], data: bytes) -> bool:
        if not names or len(data) > self.max_bytes:
            return False
        key = names[-1]
        if key in self.entries:
            self.entries.move_to_end(key)
            return False
        self.entries[key] = (names, data)
        self.bytes += len(data)
        for n in names:
            self.index[n] = key
        while self.bytes > self.max_bytes:
            self._evict()
        return True

    def clear(self) -> int:
        """Drop every entry (memory pressure: a prefix is recomputed, or read from disk); how many."""
        n = len(self.entries)
        self.entries.clear()
        self.index.clear()
        self.bytes = 0
        return n

    def _evict(self) -> None:
        key, (names, data) = self.entries.popitem(last=False)
        self.bytes -= len(data)
        self.evictions += 1
        for n in names:
            if self.index.get(n) == key:
                # a shorter prefix may still be held by another entry: re-point it there
                del self.index[n]
        for other, (onames, _) in self.entries.items():
            for n in onames:
                self.index.setdefault(n, other)


class DiskTier:
    """Entries as files `<last block name>.kv` under `root`, LRU by bytes. Headers are read at
    start (payloads only on a hit); writes go through one background thread."""

    def __init__(self, root: str, max_bytes: int, fingerprint: str, block: int, log=None):
        self.root, self.max_bytes, self.block, self.log = root, max_bytes, block, log
        self.store_lock = StoreLock(root).acquire()  # one writer: StoreLocked while another generation has it
        self.fingerprint = bytes.fromhex(fingerprint).ljust(32, b"\0")[:32]
        self.files: OrderedDict[bytes, tuple[list[bytes], int]] = OrderedDict()  # key -> (names, size)
        self.index: dict[bytes, bytes] = {}
        self.bytes = 0
        self.removed_bad = 0
        self._lock = threading.Lock()  # guards files/index/bytes between the loop and the writer
        self._queue: list = []
        self._pending = 0  # puts not yet on disk
        self._wake = threading.Event()
        os.makedirs(root, mode=0o700, exist_ok=True)
        self._scan()
        threading.Thread(target=self._writer, name="prefix-disk-writer", daemon=True).start()

    def _path(self, key: bytes) -> str:
        return os.path.join(self.root, key.hex() + ".kv")

    def _scan(self) -> None:
        found = []
        for fname in os.listdir(self.root):
            path = os.path.join(self.root, fname)
            if fname.endswith(".tmp"):
                os.unlink(path)
                continue
            if not fname.endswith(".kv"):
                continue
            names = self._read_header(path)
            if names is None:
                self._remove_bad(path, "unreadable header, other model or other format")
                continue
            found.append((os.stat(path).st_mtime, names, os.path.getsize(path)))
        for _, names, size in sorted(found, key=lambda f: f[0]):  # oldest first: LRU order
            self._add(names, size)

    def _read_header(self, path: str):
        try:
            with open(path, "rb") as f:
                head = f.read(_HEAD.size)
                magic, version, fp, block, n, size, _crc = _HEAD.unpack(head)
                if magic != MAGIC or version != VERSION or fp != self.fingerprint or block != self.block or n == 0:
                    return None
                raw = f.read(16 * n)
                if len(raw) != 16 * n or os.path.getsize(path) != _HEAD.size + 16 * n + size:
                    return None
                return [raw[i * 16:(i + 1) * 16] for i in range(n)]
        except (OSError, struct.error):
            return None

    def _remove_bad(self, path: str, why: str) -> None:
        self.removed_bad += 1
        if self.log:
            self.log.warning("prefix cache file skipped and removed", file=path, reason=why)
        try:
            os.unlink(path)
        except OSError:
            pass

    def _add(self, names: list[bytes], size: int) -> None:
        with self._lock:
            key = names[-1]
            self.files[key] = (names, size)
            self.bytes += size
            for n in names:
                self.index[n] = key
            while self.bytes > self.max_bytes and len(self.files) > 1:
                old, (onames, osize) = self.files.popitem(last=False)
                self.bytes -= osize
                for n in onames:
                    if self.index.get(n) == old:
                        del self.index[n]
                try:
                    os.unlink(self._path(old))
                except OSError:
                    pass

    def longest(self, names: list[bytes]) -> tuple[int, bytes | None]:
        with self._lock:
            for i in range(len(names) - 1, -1, -1):
                key = self.index.get(names[i])
                if key is not None:
                    return i + 1, key
        return 0, None

    def get(self, key: bytes) -> bytes | None:
        """The payload, or None (and the file removed) when it is damaged."""
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                magic, version, fp, block, n, size, crc = _HEAD.unpack(f.read(_HEAD.size))
                f.seek(16 * n, os.SEEK_CUR)
                data = f.read(size)
        except (OSError, struct.error):
            data, crc = None, 0
        if data is None or zlib.crc32(data) != crc:
            self._forget(key)
            self._remove_bad(path, "checksum mismatch or truncated")
            return None
        with self._lock:
            if key in self.files:
                self.files.move_to_end(key)
        return data

    def _forget(self, key: bytes) -> None:
        with self._lock:
            names, size = self.files.pop(key, ([], 0))
            self.bytes -= size
            for n in names:
                if self.index.get(n) == key:
                    del self.index[n]

    def put(self, names: list[bytes], data: bytes) -> None:
        """Write behind: the file appears in the index once it is complete on disk."""
        if not names or len(data) > self.max_bytes:
            return
        with self._lock:
            if names[-1] in self.files:
                return
            self._pending += 1
        self._queue.append((names, data))
        self._wake.set()

    def _writer(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._queue:
                names, data = self._queue.pop(0)
                path = self._path(names[-1])
                tmp = path + ".tmp"
                try:
                    with open(tmp, "wb") as f:
                        f.write(_HEAD.pack(MAGIC, VERSION, self.fingerprint, self.block, len(names), len(data),
                                           zlib.crc32(data)))
                        f.write(b"".join(names))
                        f.write(data)
                    os.replace(tmp, path)
                    self._add(names, _HEAD.size + 16 * len(names) + len(data))
                except OSError as e:
                    if self.log:
                        self.log.warning("prefix cache write failed", file=path, error=str(e))
                finally:
                    with self._lock:
                        self._pending -= 1

    def close(self, timeout: float = 2.0) -> None:
        """Finish queued writes and let go of the directory (the next generation takes it)."""
        self.flush(timeout)
        self.store_lock.release()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until queued writes are on disk (tests, shutdown)."""
        import time
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.005)
