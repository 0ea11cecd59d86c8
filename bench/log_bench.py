"""Event-log benchmarks.

    python bench/log_bench.py writer [--records 200000] [--batch 1000]
    python bench/log_bench.py http   [--seconds 10] [--clients 16]
    python bench/log_bench.py all

writer: ~200-byte JSON events, one write + fsync per batch of `batch` records, in the same run:
the Cython writer (CRC32C, LZ4 blocks), a plain-Python writer with the same framing (zlib's
crc32, no compression), SQLite in WAL mode (synchronous=FULL, executemany + commit per batch),
and the disk's own sequential write figure (1 MiB writes + one fsync) measured the same way.
Targets: Cython >= 5x SQLite, and within 2x of the disk's MB/s.
http: 2 ingress workers, clients posting batches of 100 events and waiting for each 202 (ack
after fsync); events/s, p50/p99 ack latency, and the view builder's lag meanwhile.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sqlite3
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers as S  # noqa: E402

from tidegate.ext.logwriter import LogWriter  # noqa: E402


def events(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        e = {"key": f"user-{(i * 7919) % 50000}", "type": ("click", "view", "buy")[i % 3], "ts": 1795000000.0 + i * 0.37,
             "payload": {"page": f"/products/{(i * 104729) % 99991}", "ref": ("search", "ad", "mail")[i % 3],
                         "session": f"{(i * 2654435761) % 2**32:08x}", "price": round((i * 37) % 10000 / 7, 2)},
             "ingest": 1795000000.5 + i * 0.37}
        out.append(json.dumps(e).encode())
    return out


def cython_writer(d: str, recs: list[bytes], batch: int) -> float:
    w = LogWriter(d, 0, 1 << 30, True)
    t0 = time.perf_counter()
    for i in range(0, len(recs), batch):
        w.append_many(recs[i:i + batch])
        w.write_block(w.seal()[0])
    dt = time.perf_counter() - t0
    w.close()
    return dt


def python_writer(d: str, recs: list[bytes], batch: int) -> float:
    fd = os.open(os.path.join(d, "py.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    rec = struct.Struct("<II")
    t0 = time.perf_counter()
    for i in range(0, len(recs), batch):
        buf = bytearray()
        for r in recs[i:i + batch]:
            buf += rec.pack(len(r), zlib.crc32(r))
            buf += r
        body = bytes(buf)
        os.write(fd, struct.pack("<4sII", b"TGB1", len(body), zlib.crc32(body)) + body)
        os.fdatasync(fd)
    dt = time.perf_counter() - t0
    os.close(fd)
    return dt


def sqlite_writer(d: str, recs: list[bytes], batch: int) -> float:
    db = sqlite3.connect(os.path.join(d, "events.db"))
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE ev (seq INTEGER PRIMARY KEY, payload BLOB)")
    t0 = time.perf_counter()
    for i in range(0, len(recs), batch):
        db.executemany("INSERT INTO ev (payload) VALUES (?)", [(r,) for r in recs[i:i + batch]])
        db.commit()
    dt = time.perf_counter() - t0
    db.close()
    return dt


def disk_sequential(d: str, total: int) -> float:
    """Seconds to write `total` bytes in 1 MiB writes and one fsync."""
    chunk = os.urandom(1 << 20)
    fd = os.open(os.path.join(d, "dd.bin"), os.O_WRONLY | os.O_CREAT, 0o600)
    t0 = time.perf_counter()
    for _ in range(max(1, total >> 20)):
        os.write(fd, chunk)
    os.fsync(fd)
    dt = time.perf_counter() - t0
    os.close(fd)
    return dt


def writer(n: int, batch: int, rounds: int = 3) -> None:
    recs = events(n)
    mb = sum(len(r) for r in recs) / 2**20
    res: dict[str, list] = {"cython": [], "python": [], "sqlite": [], "disk": []}
    for _ in range(rounds):
        for name, fn in (("cython", cython_writer), ("python", python_writer), ("sqlite", sqlite_writer)):
            d = tempfile.mkdtemp(prefix="tidegate-logbench-", dir=os.environ.get("BENCH_DIR"))
            res[name].append(fn(d, recs, batch))
        d = tempfile.mkdtemp(prefix="tidegate-logbench-", dir=os.environ.get("BENCH_DIR"))
        res["disk"].append(disk_sequential(d, 256 << 20) / (256 / mb))  # scaled to the same bytes
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"{n} events of ~{mb * 2**20 / n:.0f} bytes ({mb:.0f} MiB), fsync per {batch}; medians of {rounds}:")
    for k in ("cython", "python", "sqlite"):
        print(f"  {k:7} {n / med[k]:10.0f} events/s  {mb / med[k]:7.1f} MB/s")
    print(f"  disk sequential write (1 MiB writes + fsync): {mb / med['disk']:.1f} MB/s")
    print(f"  cython vs sqlite: {med['sqlite'] / med['cython']:.1f}x;  vs plain python: "
          f"{med['python'] / med['cython']:.1f}x;  vs the disk's MB/s: {med['disk'] / med['cython']:.2f}x "
          f"(logical bytes; LZ4 writes fewer)")


def codecs() -> None:
    """Why LZ4: compress speed vs ratio on a block of realistic events (zstandard: bench extra)."""
    import lz4.block
    import zstandard
    block = b"".join(events(5000))
    cands = [("lz4", lambda b: lz4.block.compress(b, store_size=False))]
    for level in (1, 3):
        z = zstandard.ZstdCompressor(level=level)
        cands.append((f"zstd-{level}", z.compress))
    print(f"block compression, {len(block) // 1024} KiB of events (write path: one block per fsync):")
    for name, fn in cands:
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            out = fn(block)
            runs.append(time.perf_counter() - t0)
        mbs = len(block) / statistics.median(runs) / 2**20
        print(f"  {name:7} {mbs:8.0f} MB/s  ratio {len(block) / len(out):5.2f}")


def http_load(seconds: float, clients: int) -> None:
    tmp = tempfile.mkdtemp(prefix="tidegate-evhttp-")
    srv = S.tidegate(tmp, workers=2, extra='[events]\nviews = [{name = "clicks", kind = "count", event_type = "click"}]\n')
    S.SERVER_CPU = "0-1"
    srv.start()
    lat, sent, lags = [], [0], []
    stop = threading.Event()

    def client(c):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        i = 0
        while not stop.is_set():
            body = json.dumps([{"key": f"u{c}-{j % 50}", "type": "click", "payload": {"i": i, "j": j}}
                               for j in range(100)])
            t0 = time.perf_counter()
            conn.request("POST", "/v1/events", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            answer = r.read()
            if r.status != 202:
                print("  unexpected", r.status, answer[:300], flush=True)
                continue
            lat.append(time.perf_counter() - t0)
            sent[0] += 100
            i += 1

    def lag_probe():
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        while not stop.is_set():
            conn.request("GET", "/readyz")
            lags.append(json.loads(conn.getresponse().read()).get("view_lag_seconds", 0.0))
            time.sleep(0.5)
    try:
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        threads.append(threading.Thread(target=lag_probe))
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
    finally:
        srv.stop()
    lat.sort()
    print(f"2 workers, {clients} clients posting 100 events and waiting for the 202 (after fsync), {seconds:.0f} s:")
    print(f"  {sent[0] / seconds:.0f} events/s; ack latency p50 {lat[len(lat) // 2] * 1e3:.2f} ms, "
          f"p99 {lat[int(len(lat) * .99)] * 1e3:.2f} ms; view lag median {statistics.median(lags or [0]):.2f} s, "
          f"max {max(lags or [0]):.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["writer", "http", "all"])
    ap.add_argument("--records", type=int, default=200000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    if args.what in ("writer", "all"):
        codecs()
        writer(args.records, args.batch)
    if args.what in ("http", "all"):
        http_load(args.seconds, args.clients)


if __name__ == "__main__":
    main()
