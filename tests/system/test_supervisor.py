"""The supervisor end to end: process names, respawn, hangs, reload, drain, stop, boot failures,
admin commands, metrics across workers, systemd notifications, control-socket security, logs."""
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import psutil
import pytest
import zmq

from helpers.http import Reader, connect, request
from helpers.wait import wait_for


def worker_pids(d) -> dict[int, int]:
    """slot -> pid of the ready workers of the current generation."""
    rows = d.admin_json("workers")["body"]
    gen = max(r["gen"] for r in rows)
    return {r["slot"]: r["pid"] for r in rows if r["state"] == "ready" and r["gen"] == gen}


class Load:
    """Background client: one new connection per request, counting outcomes."""

    def __init__(self, port, path="/healthz"):
        self.port, self.path = port, path
        self.ok = self.failed = self.refused = 0
        self.errors = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            try:
                r = request(self.port, path=self.path)
                if r.status == 200:
                    self.ok += 1
                else:
                    self.failed += 1
                    self.errors.append(r.status)
            except ConnectionRefusedError:
                self.refused += 1
            except OSError as e:
                self.failed += 1
                self.errors.append(repr(e))
            time.sleep(0.002)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


def test_process_names_and_help(daemon_factory):
    d = daemon_factory(workers=2)
    sup = psutil.Process(d.proc.pid)
    titles = sorted(" ".join(c.cmdline()).strip() for c in sup.children())
    assert titles == ["tidegate: ingress 0", "tidegate: ingress 1"]
    assert " ".join(sup.cmdline()).strip() == "tidegate: supervisor"
    for args in (["--help"], ["serve", "--help"], ["admin", "--help"], ["admin", "status", "--help"], ["version"]):
        r = subprocess.run([sys.executable, "-m", "tidegate.workers.cli", *args], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip(), args


def test_sigkill_worker_under_load_is_respawned(daemon_factory):
    d = daemon_factory(workers=2)
    before = worker_pids(d)
    with Load(d.port) as load:
        time.sleep(0.5)
        ok_before = load.ok
        os.kill(before[0], signal.SIGKILL)
        after = wait_for(lambda: (p := worker_pids(d)) and len(p) == 2 and p[0] != before[0] and p, what="respawn")
        time.sleep(0.5)
    assert after[1] == before[1]  # the other worker was untouched and kept serving
    assert load.ok > ok_before + 20
    assert load.refused == 0
    assert load.failed <= 2, load.errors  # at most what was in flight on the killed worker
    assert d.admin_json("status")["body"]["respawns"] == 1
    assert any(e["event"] == "worker died; respawning" for e in d.events())


def test_hung_worker_is_killed_and_respawned(daemon_factory):
    d = daemon_factory(workers=1, server={"worker_timeout": 1.0})
    pid = worker_pids(d)[0]
    os.kill(pid, signal.SIGSTOP)
    d.wait_event("worker missed heartbeats; killing it")
    new = wait_for(lambda: (p := worker_pids(d)) and p.get(0) not in (None, pid) and p, what="respawn")
    assert request(d.port).status == 200 and new[0] != pid


def gone(pid: int) -> bool:
    """The process has exited (or is a zombie); it may vanish between the checks."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sighup_reload_applies_new_config_without_refusing(daemon_factory):
    d = daemon_factory(workers=2, limits={"max_body_bytes": 1000})
    assert request(d.port, "POST", "/v1/echo", b'"' + b"x" * 2000 + b'"').status == 413
    old = set(worker_pids(d).values())
    d.rewrite_config(limits={"max_body_bytes": 100000})
    with Load(d.port) as load:
        time.sleep(0.3)
        d.signal(signal.SIGHUP)
        d.wait_event("reloaded")
        wait_for(lambda: all(gone(p) for p in old), what="old workers gone")
        time.sleep(0.3)
    assert load.refused == 0 and load.failed == 0, load.errors
    assert load.ok > 20
    assert request(d.port, "POST", "/v1/echo", b'"' + b"x" * 2000 + b'"').status == 200
    new = set(worker_pids(d).values())
    assert not (new & old) and len(new) == 2
    assert d.admin_json("status")["body"]["generation"] == 2


def test_sighup_with_broken_config_keeps_serving(daemon_factory):
    d = daemon_factory(workers=1, limits={"max_body_bytes": 1000})
    pids = worker_pids(d)
    d.rewrite_config(limits={"max_body_bytes": "lots"})
    d.signal(signal.SIGHUP)
    ev = d.wait_event("reload rejected; still serving with the previous config")[0]
    assert "limits.max_body_bytes" in ev["error"]
    assert worker_pids(d) == pids
    assert request(d.port, "POST", "/v1/echo", b'"' + b"x" * 2000 + b'"').status == 413
    r = d.admin("reload")
    assert r.returncode == 1 and "limits.max_body_bytes" in r.stderr


def test_reload_whose_workers_fail_to_boot_keeps_old_ones(daemon_factory):
    d = daemon_factory(workers=1)
    pids = worker_pids(d)
    # a valid config whose new bind address cannot be taken: the reload is refused, old workers stay
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    d.rewrite_config(server={"bind": f"127.0.0.1:{blocker.getsockname()[1]}"})
    r = d.admin("reload")
    blocker.close()
    assert r.returncode == 1 and "cannot bind" in r.stderr
    assert worker_pids(d) == pids and request(d.port).status == 200


def test_sigterm_drains_in_flight_request(daemon_factory):
    d = daemon_factory(workers=2)
    s = connect(d.port)
    body = b'{"in": "flight"}'
    s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % len(body) + body[:5])
    time.sleep(0.3)
    d.signal(signal.SIGTERM)
    d.wait_event("draining")
    time.sleep(0.5)
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        socket.create_connection(("127.0.0.1", d.port), timeout=1).close()
    s.sendall(body[5:])
    reply = Reader(s).read()
    assert reply.status == 200 and reply.json()["data"] == {"in": "flight"}
    assert reply.headers["connection"] == "close"
    assert d.wait_exit() == 0


def test_sigint_stops_fast(daemon_factory):
    d = daemon_factory(workers=2)
    s = connect(d.port)
    s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")  # never finished
    t0 = time.time()
    d.signal(signal.SIGINT)
    assert d.wait_exit(10) == 0
    assert time.time() - t0 < 3
    assert not [p for p in psutil.process_iter(["cmdline"]) if "tidegate: ingress" in " ".join(p.info["cmdline"] or [])
                and p.ppid() == d.proc.pid]


def test_worker_boot_failure_stops_daemon(daemon_factory):
    d = daemon_factory(workers=2, start=False, env={"TIDEGATE_FAILPOINTS": "ingress.boot"})
    d.start(wait=False)
    assert d.wait_exit(20) == 3
    logs = d.logs()
    assert "worker failed to boot" in logs and "failpoint ingress.boot" in logs


def test_port_in_use_stops_with_message(daemon_factory):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    d = daemon_factory(start=False, server={"bind": f"127.0.0.1:{port}"})
    d.start(wait=False)
    assert d.wait_exit(20) == 4
    assert "Address already in use" in d.logs()
    blocker.close()


def test_bad_config_at_start_names_key(daemon_factory):
    d = daemon_factory(start=False, server={"workerz": 2})
    d.start(wait=False)
    assert d.wait_exit(20) == 1
    assert "server.workerz: unknown key" in d.logs()


def test_admin_commands(daemon_factory):
    d = daemon_factory(workers=2)
    st = d.admin_json("status")["body"]
    assert st["state"] == "running" and st["workers_ready"] == 2 and st["bind"] == [f"127.0.0.1:{d.port}"]
    table = d.admin("status")
    assert table.returncode == 0 and re.search(r"state\s+running", table.stdout)
    rows = d.admin_json("workers")["body"]
    assert sorted(r["slot"] for r in rows) == [0, 1] and all(r["rss_bytes"] > 0 for r in rows)
    assert "open_connections" in d.admin("workers").stdout
    cfg = d.admin_json("config")["body"]
    assert cfg["config"]["server"]["workers"] == 2 and cfg["path"] == str(d.config_path)
    assert "limits.max_body_bytes" in d.admin("config").stdout
    request(d.port)
    assert "tidegate_http_requests_total" in d.admin("metrics").stdout
    r = d.admin("reload")
    assert r.returncode == 0 and "reloaded" in r.stdout
    assert d.admin_json("status")["body"]["generation"] == 2
    r = d.admin("drain")
    assert r.returncode == 0
    assert d.wait_exit() == 0
    r = d.admin("status")
    assert r.returncode == 3 and "no tidegate daemon is running" in r.stderr


def test_admin_stop(daemon_factory):
    d = daemon_factory(workers=1)
    assert d.admin("stop").returncode == 0
    assert d.wait_exit() == 0


def test_admin_without_daemon(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tidegate.workers.cli", "admin", "status"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 3 and "no tidegate daemon is running" in r.stderr


def test_metrics_sum_all_workers(daemon_factory):
    d = daemon_factory(workers=2)
    n = 60
    for _ in range(n):
        assert request(d.port, path="/healthz").status == 200

    def per_worker_total():
        rows = d.admin_json("workers")["body"]
        return rows if sum(r["requests"] for r in rows) >= n else None

    rows = wait_for(per_worker_total, what="heartbeats carry counts")
    assert all(r["requests"] > 0 for r in rows), rows  # both workers served some: the sum is a real sum
    for _ in range(3):  # whichever worker answers /metrics, it reports the total
        text = request(d.port, path="/metrics").body.decode()
        m = re.search(r'tidegate_http_requests_total\{route="/healthz",status="200"\} (\d+)', text)
        assert int(float(m.group(1))) == n
    assert "tidegate_http_request_duration_seconds_bucket" in text
    assert "tidegate_connections_open" in text and "tidegate_http_sent_bytes_total" in text
    assert "tidegate_workers_ready 2.0" in text


def test_readyz_reflects_workers(daemon_factory):
    d = daemon_factory(workers=2, server={"respawn_backoff_max": 5.0})
    r = request(d.port, path="/readyz")
    assert r.status == 200 and r.json() == {"ready": True, "state": "running", "workers_ready": 2,
                                            "workers_expected": 2, "view_lag_seconds": 0, "degraded": {}}
    # crash slot 0 in a loop: respawn backoff grows, and meanwhile the daemon is not ready
    for _ in range(4):
        old = worker_pids(d)[0]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: (p := worker_pids(d)) and p.get(0) not in (None, old), what="respawn")
    os.kill(worker_pids(d)[0], signal.SIGKILL)  # the 5th quick death waits 1.6 s before respawn

    def not_ready():
        try:
            r = request(d.port, path="/readyz", timeout=0.15)
        except OSError:
            return None  # landed on the dead slot's backlog
        return r if r.status == 503 else None
    r = wait_for(not_ready, timeout=3, what="503 from /readyz")
    assert r.json()["ready"] is False and r.json()["workers_ready"] == 1
    assert "respawning" in r.json()["degraded"]["0"]  # names the part that is down
    wait_for(lambda: request(d.port, path="/readyz").status == 200, what="ready again")


def test_systemd_notify(daemon_factory, tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(sock_path)
    ns.settimeout(0.2)
    got = []

    def drain():
        try:
            while True:
                got.extend(ns.recv(4096).decode().split("\n"))
        except socket.timeout:
            pass

    d = daemon_factory(workers=1, env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"})
    time.sleep(0.6)
    drain()
    assert "READY=1" in got and got.count("WATCHDOG=1") >= 2
    got.clear()
    d.signal(signal.SIGHUP)
    d.wait_event("reloaded")
    time.sleep(0.3)
    drain()
    assert "RELOADING=1" in got and "READY=1" in got
    assert got.index("RELOADING=1") < got.index("READY=1")
    assert any(x.startswith("MONOTONIC_USEC=") for x in got)
    got.clear()
    d.signal(signal.SIGTERM)
    d.wait_exit()
    drain()
    assert "STOPPING=1" in got


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_unit_file_verifies():
    unit = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "tidegate.service")
    r = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True)
    # verify complains about the ExecStart binary when tidegate is not installed under /usr/local/bin
    problems = [l for l in r.stderr.splitlines() if l.strip() and "/usr/local/bin/tidegate" not in l]
    assert not problems, r.stderr


def test_unit_file_lets_only_gpu_devices_through():
    unit = open(os.path.join(os.path.dirname(__file__), "..", "..", "conf", "tidegate.service")).read()
    lines = {l.strip() for l in unit.splitlines()}
    # a CUDA inference worker needs /dev/nvidia*: not hidden by PrivateDevices, and nothing else let in
    assert "PrivateDevices=yes" not in lines and "DevicePolicy=closed" in lines
    assert {l.split("=", 1)[1].split()[0] for l in lines if l.startswith("DeviceAllow=")} == {
        "char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps"}


def test_control_socket_permissions(daemon_factory):
    d = daemon_factory(workers=1)
    run = d.dir / "run"
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(run / "control.sock").st_mode) == 0o600


def test_tcp_control_requires_curve(daemon_factory):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    p = port.getsockname()[1]
    port.close()
    d = daemon_factory(start=False, control={"endpoint": f"tcp://127.0.0.1:{p}"})
    d.start(wait=False)
    assert d.wait_exit(20) == 1
    assert "control.endpoint: a tcp:// control socket needs" in d.logs()


def test_tcp_control_with_curve_keys(daemon_factory):
    srv_pub, srv_sec = zmq.curve_keypair()
    cli_pub, cli_sec = zmq.curve_keypair()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
    d = daemon_factory(control={"endpoint": f"tcp://127.0.0.1:{p}", "curve_public_key": srv_pub.decode(),
                                "curve_secret_key": srv_sec.decode(), "curve_client_keys": [cli_pub.decode()],
                                "client_public_key": cli_pub.decode(), "client_secret_key": cli_sec.decode()})
    assert d.admin_json("status")["body"]["state"] == "running"
    assert srv_sec.decode() not in d.admin("config").stdout
    # workers get their spec through a memfd read once, with secrets masked: nothing in environ
    for row in d.admin_json("workers")["body"]:
        with open(f"/proc/{row['pid']}/environ", "rb") as f:
            environ = f.read()
        assert srv_sec not in environ and b"curve" not in environ and b"TIDEGATE_WORKER_SPEC_FD" in environ
    # a client whose key is not on the list gets no answer
    other_pub, other_sec = zmq.curve_keypair()
    d.rewrite_config(control={"client_public_key": other_pub.decode(), "client_secret_key": other_sec.decode()})
    r = d.admin("--timeout", "1", "status")
    assert r.returncode == 3


def test_logs_are_json_and_never_contain_secrets(daemon_factory):
    d = daemon_factory(workers=1, log={"access": True})
    secret = "sk-supersecret0123456789"
    request(d.port, path="/healthz?api_key=" + secret, headers={"Authorization": f"Bearer {secret}"})
    request(d.port, path="/nope/" + secret)
    d.admin("stop")
    d.wait_exit()
    text = d.logs()
    assert secret not in text
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
        assert {"time", "level", "process", "event"} <= rec.keys(), line
    assert any(e["event"] == "access" for e in d.events())


def test_control_socket_caps_message_size(daemon_factory):
    d = daemon_factory(workers=1, control={"max_message_bytes": 4096})
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{d.dir / 'run' / 'control.sock'}")
    s.send_multipart([b"", b'{"op": "status", "pad": "' + b"x" * 100000 + b'"}'])
    s.setsockopt(zmq.RCVTIMEO, 1000)
    with pytest.raises(zmq.Again):  # the oversized message is dropped with its connection
        s.recv_multipart()
    s.close()
    ctx.term()
    assert d.admin_json("status")["body"]["state"] == "running"
    assert request(d.port).status == 200
