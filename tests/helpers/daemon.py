"""The real daemon under test: `tidegate serve` on a free loopback port with its own dirs and config."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from tidegate.core.base.config import toml_value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path, sections: dict) -> None:
    lines = []
    for sec, body in sections.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n")


class Daemon:
    """One `tidegate serve` process with its own run/data dirs and config file."""

    def __init__(self, tmp_path, workers: int = 1, env: dict | None = None, nofile: int = 0, **sections):
        self.dir = tmp_path
        self.nofile = nofile  # > 0: the daemon's open-files limit (soft and hard)
        self.port = free_port()
        self.config_path = tmp_path / "tidegate.toml"
        self.sections = {"server": {"bind": f"127.0.0.1:{self.port}", "workers": workers,
                                    "run_dir": str(tmp_path / "run"), "data_dir": str(tmp_path / "data"),
                                    "heartbeat_interval": 0.2, "graceful_timeout": 5.0,
                                    # tests read counters right after what moves them: no render
                                    # cache, and as often as they wait for one (no scrape limit)
                                    "metrics_interval": 0.001, "metrics_rps_per_address": 0.0},
                         # no model unless a test asks: the HTTP and state tests do not need one
                         "inference": {"enabled": False},
                         # a shared CI machine runs loops late at random: shedding on it would make
                         # answers of background requests depend on the neighbours (tests/unit/overload)
                         "overload": {"loop_lag": 0.0}}
        for sec, body in sections.items():
            self.sections.setdefault(sec, {}).update(body)
        write_config(self.config_path, self.sections)
        self.log_path = tmp_path / "daemon.log"
        self.env = dict(os.environ, **(env or {}))
        self.proc = None

    def start(self, wait: bool = True) -> "Daemon":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tidegate.workers.cli", "serve", "--config",
                                      str(self.config_path)], stdout=self.log, stderr=self.log, env=self.env,
                                     cwd=self.dir, preexec_fn=self._limits if self.nofile else None)
        if wait:
            self.wait_ready()
        return self

    def _limits(self) -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

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
        return subprocess.run([sys.executable, "-m", "tidegate.workers.cli", "admin", "--config",
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
