"""One writer per durable store: a second opener fails fast, a waiting one gets the store as
soon as the holder lets go, and a killed holder never leaves it locked."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tidegate.core.base.filelock import StoreLock, StoreLocked, is_locked
from tidegate.core.events.eventlog import Partition
from tidegate.core.state.sessions import SessionStore


def test_second_writer_of_each_store_fails_fast(tmp_path):
    p = Partition(str(tmp_path / "p-0"))
    with pytest.raises(StoreLocked):
        Partition(str(tmp_path / "p-0"))
    s = SessionStore(str(tmp_path / "sessions-0"), ttl=60, max_sessions=10)
    with pytest.raises(StoreLocked):
        SessionStore(str(tmp_path / "sessions-0"), ttl=60, max_sessions=10)
    assert is_locked(str(tmp_path / "p-0")) and is_locked(str(tmp_path / "sessions-0"))
    p.close()
    s.close()
    assert not is_locked(str(tmp_path / "p-0")) and not is_locked(str(tmp_path / "sessions-0"))
    Partition(str(tmp_path / "p-0")).close()  # free again once closed


def test_a_waiting_opener_gets_the_store_when_the_holder_lets_go(tmp_path):
    held = StoreLock(str(tmp_path)).acquire()
    threading.Timer(0.1, held.release).start()
    t0 = time.monotonic()
    StoreLock(str(tmp_path)).acquire(wait=2.0).release()
    assert 0.05 < time.monotonic() - t0 < 1.0


def test_a_killed_holder_leaves_no_lock(tmp_path):
    code = ("import sys, time; from tidegate.core.base.filelock import StoreLock; "
            f"StoreLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"held"
    assert is_locked(str(tmp_path))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not is_locked(str(tmp_path))
