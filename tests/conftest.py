"""Test harness: start the real daemon on a free loopback port and talk to it over sockets."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # inline table
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def write_config(path, sections: dict) -> None:
    lines = []
    for sec, body in sections.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n")


class Daemon:
    """One `tidegate serve` process with its own run/data dirs and config file."""

    def __init__(self, tmp_path, workers: int = 1, env: dict | None = None, **sections):
        self.dir = tmp_path
        self.port = free_port()
        self.config_path = tmp_path / "tidegate.toml"
        self.sections = {"server": {"bind": f"127.0.0.1:{self.port}", "workers": workers,
                                    "run_dir": str(tmp_path / "run"), "data_dir": str(tmp_path / "data"),
                                    "heartbeat_interval": 0.2, "graceful_timeout": 5.0},
                         # no model unless a test asks: the HTTP and state tests do not need one
                         "inference": {"enabled": False}}
        for sec, body in sections.items():
            self.sections.setdefault(sec, {}).update(body)
        write_config(self.config_path, self.sections)
        self.log_path = tmp_path / "daemon.log"
        self.env = dict(os.environ, **(env or {}))
        self.proc = None

    def start(self, wait: bool = True) -> "Daemon":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tidegate.core.cli", "serve", "--config",
                                      str(self.config_path)], stdout=self.log, stderr=self.log, env=self.env,
                                     cwd=self.dir)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
            if any(e.get("event") == "ready" for e in self.events()):
                return
            time.sleep(0.05)
        raise TimeoutError(f"daemon not ready:\n{self.logs()}")

    def rewrite_config(self, **sections) -> None:
        for sec, body in sections.items():
            self.sections.setdefault(sec, {}).update(body)
        write_config(self.config_path, self.sections)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict]:
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_event(self, event: str, count: int = 1, timeout: float = 15.0) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [e for e in self.events() if e.get("event") == event]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise TimeoutError(f"no {count}x {event!r} in log:\n{self.logs()[-4000:]}")

    def admin(self, *args, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tidegate.core.cli", "admin", "--config",
                               str(self.config_path), *args], capture_output=True, text=True, timeout=timeout,
                              cwd=self.dir)

    def admin_json(self, *args) -> dict:
        r = self.admin("--json", *args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The tiny demo GGUF, built once per test session."""
    from tidegate.core.demo_model import make_demo
    return make_demo(str(tmp_path_factory.mktemp("model") / "demo.gguf"))


@pytest.fixture
def daemon_factory(tmp_path):
    started = []

    def make(workers: int = 1, start: bool = True, env: dict | None = None, **sections) -> Daemon:
        sub = tmp_path / f"d{len(started)}"
        sub.mkdir()
        d = Daemon(sub, workers=workers, env=env, **sections)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop()


# ---- raw HTTP over a socket -------------------------------------------------------------------
class HttpReply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Reader:
    """Reads Content-Length framed responses (all tidegate sends) from a socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read(self) -> HttpReply:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"connection closed; got {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
        if status == 100:
            return self.read()
        n = int(headers.get("content-length", 0))
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("connection closed mid-body")
        body, self.buf = self.buf[:n], self.buf[n:]
        return HttpReply(status, headers, body)

    def closed(self, timeout: float = 3.0) -> bool:
        """True if the peer closes (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


def request(port: int, method: str = "GET", path: str = "/healthz", body: bytes | None = None,
            headers: dict | None = None, timeout: float = 5.0) -> HttpReply:
    with connect(port, timeout) as s:
        h = {"Host": "t", "Connection": "close", **(headers or {})}
        if body is not None:
            h.setdefault("Content-Type", "application/json")
            h["Content-Length"] = str(len(body))
        raw = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        s.sendall(raw.encode() + (body or b""))
        return Reader(s).read()


def raw_exchange(port: int, data: bytes) -> tuple[HttpReply, bool]:
    """Send raw bytes; return the first reply and whether the server then closed the connection."""
    with connect(port) as s:
        s.sendall(data)
        r = Reader(s)
        reply = r.read()
        return reply, r.closed(timeout=1.0)
