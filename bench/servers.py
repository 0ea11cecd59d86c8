"""Start tidegate and the baselines (uvicorn bare ASGI, nginx) for the load scripts.

Each server runs with one worker, pinned to CPU 0 when the machine has a second core for the
load generator. wrk and nginx come from Debian packages (wrk, nginx-light): installed here with
apt-get if missing.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_CPU, CLIENT_CPU = "0", "1"


def pinned(cmd: list[str], cpu: str) -> list[str]:
    return (["taskset", "-c", cpu] + cmd) if shutil.which("taskset") and os.cpu_count() > 1 else cmd


def ensure_tools(*names: str) -> None:
    missing = [n for n in names if not shutil.which(n) and not os.path.exists(f"/usr/sbin/{n}")]
    if missing:
        pkgs = {"wrk": "wrk", "nginx": "nginx-light"}
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq"] + [pkgs[m] for m in missing], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, tmp: str, worker_match: str | None = None):
        self.name, self.cmd, self.port, self.tmp, self.worker_match = name, cmd, port, tmp, worker_match
        self.proc = None

    def start(self, timeout: float = 20.0) -> "Server":
        self.log = open(os.path.join(self.tmp, f"{self.name}.log"), "wb")
        self.proc = subprocess.Popen(pinned(self.cmd, SERVER_CPU), stdout=self.log, stderr=self.log, cwd=self.tmp)
        wait_port(self.port, timeout)
        time.sleep(0.5)
        return self

    def worker(self) -> psutil.Process:
        """The process that serves connections (a child for prefork servers)."""
        root = psutil.Process(self.proc.pid)
        if self.worker_match:
            for _ in range(100):
                for p in root.children(recursive=True):
                    if self.worker_match in " ".join(p.cmdline()):
                        return p
                time.sleep(0.05)
        return root

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def tidegate(tmp: str, workers: int = 1, extra: str = "", inference: bool = False) -> Server:
    """A tidegate daemon; without a model unless `inference` (the HTTP benchmarks need none)."""
    port = free_port()
    if not inference:
        extra += "\n[inference]\nenabled = false\n"
    conf = os.path.join(tmp, "tidegate.toml")
    with open(conf, "w") as f:
        f.write(f'[server]\nbind = "127.0.0.1:{port}"\nworkers = {workers}\nrun_dir = "{tmp}/run"\n'
                f'data_dir = "{tmp}/data"\nmax_connections = 20000\n[limits]\nkeepalive_timeout = 600.0\n'
                f'[log]\nlevel = "warning"\n{extra}')
    return Server("tidegate", [sys.executable, "-m", "tidegate.workers.cli", "serve", "--config", conf], port, tmp,
                  worker_match="tidegate: ingress 0")


def uvicorn(tmp: str) -> Server:
    port = free_port()
    return Server("uvicorn", [sys.executable, "-m", "uvicorn", "asgi_app:app", "--app-dir", HERE, "--port", str(port),
                              "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
                              "--timeout-keep-alive", "600", "--backlog", "4096"], port, tmp)


def nginx(tmp: str) -> Server:
    port = free_port()
    os.makedirs(os.path.join(tmp, "logs"), exist_ok=True)
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1;
daemon off;
error_log {tmp}/logs/error.log;
pid {tmp}/nginx.pid;
worker_rlimit_nofile 30000;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  keepalive_timeout 600s;
  keepalive_requests 100000000;
  client_body_temp_path {tmp}/body;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
  }}
}}
""")
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    return Server("nginx", [binary, "-c", conf, "-p", tmp], port, tmp, worker_match="nginx: worker")


def raise_nofile(n: int = 65536) -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, n), hard), hard))


def make_all(names: list[str]) -> tuple[str, dict[str, Server]]:
    tmp = tempfile.mkdtemp(prefix="tidegate-bench-")
    makers = {"tidegate": tidegate, "uvicorn": uvicorn, "nginx": nginx}
    servers = {}
    for n in names:
        sub = os.path.join(tmp, n)
        os.makedirs(sub)
        servers[n] = makers[n](sub)
    return tmp, servers


def _instrument_priority() -> None:
    """The load generator shares this box with the daemon: where allowed (root), it runs at nice
    -5 so its own scheduling lag is not charged to the server it measures."""
    try:
        os.nice(-5)
    except OSError:
        pass


def loadtest(srv: Server, scenario: str, out: str, *args: str, quiet: bool = True) -> dict:
    """Run `tidegate loadtest` against a started server (quiet: without the line per second); prints
    its report, returns its report.json."""
    import json
    cmd = [sys.executable, "-m", "tidegate.workers.cli", "loadtest", scenario, "--out", out, *args]
    r = subprocess.run(cmd + (["--quiet"] if quiet else []), text=True, stdout=subprocess.PIPE,
                       preexec_fn=_instrument_priority)
    if r.returncode != 0:
        raise RuntimeError(f"loadtest failed ({r.returncode})")
    print(r.stdout, flush=True)
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)
