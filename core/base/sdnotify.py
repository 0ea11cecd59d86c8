"""systemd's sd_notify protocol: one datagram of KEY=VALUE lines to $NOTIFY_SOCKET.

Written out rather than pulled in: the protocol is a single sendto(), and the PyPI wrappers for
it are unmaintained. A missing NOTIFY_SOCKET makes every call a no-op.
"""
from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, env=os.environ):
        addr = env.get("NOTIFY_SOCKET", "")
        self.addr = "\0" + addr[1:] if addr.startswith("@") else addr  # '@' = abstract namespace
        self.sock = None
        if self.addr:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        # ping at half the interval, as sd_watchdog_enabled(3) recommends
        self.watchdog_interval = int(usec) / 2e6 if wanted else 0.0
        self._last_ping = 0.0

    def notify(self, *lines: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(lines).encode(), self.addr)
        except OSError:
            pass  # systemd gone: nothing useful to do

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", f"STATUS={status}" if status else "STATUS=serving", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload units match this to the reload they asked for
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def watchdog_due(self, now: float) -> float | None:
        """Seconds until the next ping is due (None if the watchdog is off); pings when it is due."""
        if not self.watchdog_interval:
            return None
        if now - self._last_ping >= self.watchdog_interval:
            self.notify("WATCHDOG=1")
            self._last_ping = now
        return self._last_ping + self.watchdog_interval - now
