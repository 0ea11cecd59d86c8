"""Memory per idle keep-alive connection, and whether a busy-with-idlers worker still answers.

Opens N keep-alive connections (default 10,000) to one worker, each sending one request and
reading its answer, then leaves them idle. Prints the worker's RSS growth per connection, and
the latency of requests on a fresh connection while the idlers stay open. Runs tidegate and,
side by side, nginx and uvicorn (one worker each). Targets: <= 4 KB per connection and a
request answered within 10 ms meanwhile.

    python bench/idle_conns.py [--connections 10000] [--servers tidegate,nginx,uvicorn]
"""
from __future__ import annotations

import argparse
import os
import selectors
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers as S  # noqa: E402

REQ = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"


def open_idle(port: int, n: int, batch: int = 500) -> list[socket.socket]:
    """n connections, each with one answered request, left open."""
    socks = []
    sel = selectors.DefaultSelector()
    for start in range(0, n, batch):
        group = []
        for _ in range(min(batch, n - start)):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            sel.register(s, selectors.EVENT_WRITE)
            group.append(s)
        pending = {s: b"" for s in group}
        sent = set()
        deadline = time.time() + 30
        while pending and time.time() < deadline:
            for key, ev in sel.select(timeout=1):
                s = key.fileobj
                if ev & selectors.EVENT_WRITE and s not in sent:
                    s.send(REQ)
                    sent.add(s)
                    sel.modify(s, selectors.EVENT_READ)
                elif ev & selectors.EVENT_READ:
                    data = s.recv(4096)
                    pending[s] += data
                    if b"\r\n\r\n" in pending[s] and pending[s].endswith(b"}"):
                        del pending[s]
                        sel.unregister(s)
        if pending:
            raise RuntimeError(f"{len(pending)} connections got no answer")
        socks += group
    return socks


def probe_latency(port: int, n: int = 50) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(REQ)
            buf = b""
            while not buf.endswith(b"}"):
                buf += s.recv(4096)
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(0.01)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--servers", default="tidegate,nginx,uvicorn")
    args = ap.parse_args()
    S.ensure_tools("nginx")
    S.raise_nofile(args.connections * 2 + 1000)
    tmp, servers = S.make_all(args.servers.split(","))
    rows = []
    for name, srv in servers.items():
        print(f"{name}: opening {args.connections} connections", flush=True)
        srv.start()
        try:
            worker = srv.worker()
            idle_before = probe_latency(srv.port, 20)
            rss0 = worker.memory_info().rss
            t = time.time()
            socks = open_idle(srv.port, args.connections)
            opened_s = time.time() - t
            time.sleep(2.0)
            rss1 = worker.memory_info().rss
            lat = probe_latency(srv.port)
            per_conn = (rss1 - rss0) / args.connections
            rows.append((name, per_conn, statistics.median(lat), max(lat), statistics.median(idle_before), opened_s))
            for s in socks:
                s.close()
        finally:
            srv.stop()
    print(f"\n{args.connections} idle keep-alive connections, one worker each")
    print(f"{'server':9} {'RSS/conn':>10} {'probe p50':>10} {'probe max':>10} {'p50 unloaded':>13} {'open time':>10}")
    for name, per_conn, p50, mx, p50_0, opened in rows:
        print(f"{name:9} {per_conn / 1024:>8.2f}KB {p50:>8.2f}ms {mx:>8.2f}ms {p50_0:>11.2f}ms {opened:>9.1f}s")
    ref = {r[0]: r[1] for r in rows}
    if "tidegate" in ref:
        for base in ("nginx", "uvicorn"):
            if base in ref and ref[base] > 0:
                print(f"tidegate RSS/conn = {ref['tidegate'] / ref[base]:.2f}x {base}")


if __name__ == "__main__":
    main()
