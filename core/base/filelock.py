"""One writer per durable store: an exclusive flock on a file inside the store's directory.

Every durable store (an event-log partition, a sessions LMDB, the semantic store, the views,
a prefix-cache disk tier) is opened only under its lock, so a second writer fails fast (or
waits, during a hand-off) instead of interleaving with the first. The kernel drops the lock
when its holder dies, so a SIGKILLed owner never leaves a store locked.
"""
from __future__ import annotations

import fcntl
import os
import time

LOCK_NAME = "tidegate.lock"


class StoreLocked(OSError):
    """Another process holds the store."""


class StoreLock:
    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.fd = -1

    def try_acquire(self) -> bool:
        if self.fd >= 0:
            return True
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())  # who holds it, for people
        self.fd = fd
        return True

    def acquire(self, wait: float = 0.0, poll: float = 0.005) -> "StoreLock":
        """Take the lock, waiting up to `wait` seconds for its holder to let go; StoreLocked if not."""
        deadline = time.monotonic() + wait
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise StoreLocked(f"{self.directory} is held by another process ({self.holder()})")
            time.sleep(poll)
        return self

    def holder(self) -> str:
        try:
            with open(self.path) as f:
                return f"pid {f.read().strip() or '?'}"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    @property
    def held(self) -> bool:
        return self.fd >= 0


def is_locked(directory: str) -> bool:
    """True when some process holds the store's lock (it is open for writing)."""
    lock = StoreLock(directory)
    if not os.path.exists(lock.path):
        return False
    if lock.try_acquire():
        lock.release()
        return False
    return True
