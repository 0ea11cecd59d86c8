"""Durability against the real daemon: no 202 before the fsync that covers it returns (a
failpoint delays fdatasync), fsync errors injected at the syscall (an LD_PRELOAD shim makes
fdatasync fail with EIO), and a full disk (a small tmpfs as data_dir): the refused requests get
503, nothing acknowledged is lost or duplicated, and acknowledging resumes when the disk does."""
import glob
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter

import orjson
import pytest

from helpers.http import request
from tidegate.core.events.eventlog import read_all

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    const char *flag = getenv("TIDEGATE_FAULT_FILE");
    if (flag && access(flag, F_OK) == 0) { errno = EIO; return -1; }
    return real(fd);
}
"""


def post(d, events, query=""):
    return request(d.port, "POST", "/v1/events" + query, json.dumps(events).encode(), timeout=10)


def logged(data_dir) -> Counter:
    seen = Counter()
    for part in glob.glob(os.path.join(data_dir, "events", "p-*")):
        seen.update(orjson.loads(p)["payload"]["i"] for _, p in read_all(part))
    return seen


def test_no_acknowledgement_overtakes_its_fsync(daemon_factory):
    d = daemon_factory(workers=2, env={"TIDEGATE_FAILPOINTS": "log.fsync_delay=0.6"},
                       events={"views": [{"name": "n", "kind": "count"}]})
    t0 = time.monotonic()
    r = post(d, [{"key": "u1", "type": "t", "payload": {"i": 0}}])
    assert r.status == 202 and time.monotonic() - t0 >= 0.6  # the answer waited for fdatasync to return
    # the view builder reads only what is durable: during an fsync the event is not applied yet
    done = threading.Event()
    threading.Thread(target=lambda: (post(d, [{"key": "u2", "type": "t", "payload": {"i": 1}}]), done.set())).start()
    time.sleep(0.3)
    assert request(d.port, path="/v1/views/n/u2").status == 404 and not done.is_set()
    done.wait(5)
    deadline = time.time() + 5
    while time.time() < deadline and request(d.port, path="/v1/views/n/u2").status != 200:
        time.sleep(0.05)
    assert request(d.port, path="/v1/views/n/u2").json()["value"] == 1.0
    # buffered acknowledgements do not wait (and say so)
    t0 = time.monotonic()
    r = post(d, [{"key": "u3", "type": "t", "payload": {"i": 2}}], "?ack=buffered")
    assert r.status == 202 and r.json()["durable"] is False and time.monotonic() - t0 < 0.6


def _writer(d, stop, acked, refused):
    i = 0
    while not stop.is_set():
        # one key per request: one partition, so a refusal is all-or-nothing (a request spread over
        # partitions can be refused by one after another has written its part)
        batch = [{"key": f"k{i % 7}", "type": "t", "payload": {"i": i * 10 + j}} for j in range(10)]
        try:
            r = post(d, batch)
        except OSError:
            r = None
        if r is not None and r.status == 202:
            acked.extend(b["payload"]["i"] for b in batch)
        elif r is not None:
            assert r.status == 503 and "retry-after" in r.headers and r.json()["error"]["code"] == "log_unavailable"
            refused.extend(b["payload"]["i"] for b in batch)
        i += 1


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc for the LD_PRELOAD shim")
def test_fsync_errors_at_the_syscall_refuse_then_resume(daemon_factory, tmp_path):
    (tmp_path / "shim.c").write_text(SHIM)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "shim.so"), str(tmp_path / "shim.c"), "-ldl"],
                   check=True)
    flag = tmp_path / "fail-fsync"
    d = daemon_factory(workers=2, env={"LD_PRELOAD": str(tmp_path / "shim.so"), "TIDEGATE_FAULT_FILE": str(flag)})
    stop, acked, refused = threading.Event(), [], []
    t = threading.Thread(target=_writer, args=(d, stop, acked, refused))
    t.start()
    time.sleep(0.5)
    flag.touch()  # every fdatasync in the daemon now fails with EIO
    time.sleep(1.0)
    flag.unlink()
    time.sleep(2.5)  # the probe writes and syncs a fresh segment, then acknowledging resumes
    stop.set()
    t.join()
    n_acked = len(acked)
    r = post(d, [{"key": "after", "type": "t", "payload": {"i": -1}}])
    assert r.status == 202 and refused and n_acked > 50
    d.stop()
    seen = logged(d.sections["server"]["data_dir"])
    assert all(seen[i] == 1 for i in acked)  # every acknowledged event, exactly once
    assert not any(seen[i] for i in refused)  # nothing answered 503 surfaced


def test_a_full_disk_answers_503_and_resumes_when_space_returns(daemon_factory, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        d = daemon_factory(workers=1, server={"data_dir": str(mnt / "data")}, events={"compress": False},
                           sessions={"map_bytes": 1 << 20})
        filler = mnt / "filler"
        stop, acked, refused = threading.Event(), [], []
        t = threading.Thread(target=_writer, args=(d, stop, acked, refused))
        t.start()
        time.sleep(0.3)
        with open(filler, "wb", buffering=0) as f:  # take the rest of the disk (unbuffered: close cannot fail)
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and not refused:
            time.sleep(0.05)
        assert refused, "ENOSPC should refuse"
        filler.unlink()  # space returns
        deadline = time.time() + 10
        while time.time() < deadline:
            n = len(acked)
            time.sleep(0.5)
            if len(acked) > n:
                break
        stop.set()
        t.join()
        assert post(d, [{"key": "after", "type": "t", "payload": {"i": -1}}]).status == 202
        d.stop()
        seen = logged(str(mnt / "data"))
        assert all(seen[i] == 1 for i in acked)
        assert not any(seen[i] for i in refused)
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
