"""Hostile clients against one daemon, at 10x the size of tests/system/test_adversary.py: per
attack, a victim tenant's latency while it runs against the same victim alone on the same daemon.

    python bench/adversary.py [--attacks grammar,template,metrics,dribble,ws_pinger,n_reader,paused_slots,embed]
                              [--victim-requests 40]

Each attack runs on a fresh daemon (the demo model, API keys for an attacker and a victim
tenant): first the victim alone (its p50/p99 for small chat completions), then the victim while
the attacker runs. Printed per attack: the victim's p50/p99 quiet and attacked (and the p99
ratio: the issue's bar is <= 2x), the victim's refused and failed requests, what the attacker
got, worker restarts, and the daemon's RSS (all its processes) at the end.
"""
from __future__ import annotations

import argparse
import base64
import collections
import http.client
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers as S  # noqa: E402

from tidegate.core.llm.demo_model import make_demo  # noqa: E402
from tidegate.core.state.auth import hash_key  # noqa: E402

VICTIM, ATTACKER = "sk-bench-victim-0123456789", "sk-bench-attacker-0123456789"
KEYS = (f'[[auth.keys]]\nkey_sha256 = "{hash_key(VICTIM)}"\ntenant = "victim"\n'
        f'[[auth.keys]]\nkey_sha256 = "{hash_key(ATTACKER)}"\ntenant = "attacker"\n')
MSG = [{"role": "user", "content": "How far is the moon?"}]
ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('roles must alternate') }}{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}"
               "{% endfor %}<|assistant|>")


def call(port: int, method: str, path: str, body=None, key: str = VICTIM, timeout: float = 60.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, None if body is None else json.dumps(body),
                     {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def victim(port: int, n: int) -> dict:
    lat, refused, failed = [], 0, 0
    for i in range(n):
        t0 = time.perf_counter()
        status, _ = call(port, "POST", "/v1/chat/completions",
                         {"model": "demo", "messages": MSG, "max_tokens": 8, "temperature": 0, "seed": i})
        lat.append((time.perf_counter() - t0) * 1000)
        refused += status in (429, 503)
        failed += status not in (200, 429, 503)
    lat.sort()
    return {"p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "refused": refused, "failed": failed}


# ---- the attacks: each runs until stop is set, counting what it got ------------------------------
def grammar(port, stop, got):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 20000}}}
    while not stop.is_set():
        got[call(port, "POST", "/v1/chat/completions", {"model": "demo", "messages": MSG, "max_tokens": 4,
                                                          "response_format": fmt}, ATTACKER)[0]] += 1


def template(port, stop, got):
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    while not stop.is_set():
        got[call(port, "POST", "/v1/chat/completions", {"model": "demo", "messages": twice, "max_tokens": 4},
                 ATTACKER)[0]] += 1


def metrics(port, stop, got, n=1000):
    """1,000 keep-alive connections asking /metrics back to back."""
    import asyncio
    req = b"GET /metrics HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + ATTACKER.encode() + b"\r\n\r\n"

    async def one():
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            got["connect_failed"] += 1
            return
        try:
            while not stop.is_set():
                w.write(req)
                head = await r.readuntil(b"\r\n\r\n")
                got[int(head.split(b" ", 2)[1])] += 1
                length = next((int(x.split(b":", 1)[1]) for x in head.split(b"\r\n")
                               if x.lower().startswith(b"content-length:")), 0)
                await r.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            got["dropped"] += 1
        finally:
            w.close()

    async def main():
        await asyncio.gather(*(one() for _ in range(n)))
    asyncio.run(main())


def dribble(port, stop, got, n=400):
    socks = []
    head = b"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n["
    while not stop.is_set():
        while len(socks) < n and not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                s.sendall(head)
                socks.append(s)
            except OSError:
                got["connect_failed"] += 1
                break
        send_each(socks, b"1", got, "cut")
        stop.wait(0.2)
    for s in socks:
        s.close()


def send_each(socks: list, data: bytes, got, lost: str) -> None:
    """data on every socket; one the server closed is counted under `lost` and dropped."""
    for s in list(socks):
        try:
            s.send(data)
        except OSError:
            got[lost] += 1
            socks.remove(s)
            s.close()


def ws_pinger(port, stop, got, n=200):
    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall((f"GET /v1/ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13"
                       f"\r\nAuthorization: Bearer {ATTACKER}\r\n\r\n").encode())
            socks.append(s)
        except OSError:
            got["connect_failed"] += 1
    while not stop.is_set():  # pings of its own, never reading
        send_each(socks, b"\x89\x80\x01\x02\x03\x04", got, "closed_by_server")
        stop.wait(0.5)
    for s in socks:
        s.close()


def n_reader(port, stop, got, n=10, choices=8):
    """Streams of n = 8 whose client never reads."""
    socks = []
    body = json.dumps({"model": "demo", "messages": MSG, "max_tokens": 1000, "n": choices, "stream": True}).encode()
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + ATTACKER.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        socks.append(s)
    got["streams"] = n
    stop.wait()
    for s in socks:
        s.close()


def paused_slots(port, stop, got):
    """As many single streams as there are slots for the class, none read: every slot paused."""
    n_reader(port, stop, got, n=7, choices=1)


def paused(k: int):
    """Ready once k of the attacker's sequences have paused for their reader (the streams first
    fill the socket buffers: until then they are plain load, not this attack)."""
    def ready(port) -> bool:
        text = call(port, "GET", "/metrics")[1].decode()
        return sum(float(x.split()[-1]) for x in text.splitlines()
                   if x.startswith("tidegate_llm_paused_sequences ")) >= k
    return ready


def embed(port, stop, got):
    text = " ".join(["parcel delivery customs window return label"] * 60)  # ~400 tokens: 256 of them fit 1 MiB
    while not stop.is_set():
        got[call(port, "POST", "/v1/embeddings", {"model": "demo", "input": [text] * 256}, ATTACKER,
                 timeout=600)[0]] += 1


ATTACKS = {"grammar": grammar, "template": template, "metrics": metrics, "dribble": dribble,
           "ws_pinger": ws_pinger, "n_reader": n_reader, "paused_slots": paused_slots, "embed": embed}
READY = {"n_reader": paused(4), "paused_slots": paused(7)}  # else the attack is under way after 2 s
EXTRA = {"template": f'chat_template = {json.dumps(ALTERNATING)}\n'}


def _attacker(name: str, port: int, stop, conn) -> None:
    got = collections.Counter()
    try:
        ATTACKS[name](port, stop, got)
    finally:
        conn.send(dict(got))


def run(name: str, model: str, requests: int) -> dict:
    tmp = tempfile.mkdtemp(prefix=f"adversary-{name}-")
    model_line = EXTRA.get(name, "")
    extra = (f'[inference]\nn_ctx = 2048\n[[inference.models]]\nname = "demo"\npath = "{model}"\n{model_line}'
             f'[cache]\nexact_enabled = false\nsemantic_enabled = false\n'
             f'[websocket]\nping_interval = 2.0\nping_timeout = 2.0\n')
    srv = S.tidegate(tmp, workers=1, extra=KEYS + extra, inference=True)
    if name == "dribble":  # at capacity: 400 dribblers for 500 connections
        conf = os.path.join(tmp, "tidegate.toml")
        with open(conf) as f:
            text = f.read().replace("max_connections = 20000", "max_connections = 500")
        with open(conf, "w") as f:
            f.write(text)
    srv.start()
    try:
        for _ in range(600):  # the model loads
            if call(srv.port, "POST", "/v1/chat/completions", {"model": "demo", "messages": MSG,
                                                               "max_tokens": 1})[0] == 200:
                break
            time.sleep(0.1)
        quiet = victim(srv.port, requests)
        # the attacker runs in its own process: its threads must not take the victim client's GIL
        # (an attacker is another machine; here it still shares the CPU with the daemon)
        ctx = multiprocessing.get_context("fork")
        stop, (theirs, ours) = ctx.Event(), ctx.Pipe()
        t = ctx.Process(target=_attacker, args=(name, srv.port, stop, theirs), daemon=True)
        t.start()
        ready = READY.get(name, lambda port: time.sleep(2.0) or True)
        for _ in range(240):
            if ready(srv.port):
                break
            time.sleep(0.25)  # (within server.metrics_rps_per_address)
        loud = victim(srv.port, requests)
        stop.set()
        got = ours.recv() if ours.poll(60) else {"still_running": 1}  # (one long request, not answered yet)
        t.join(30)
        status = json.loads(call(srv.port, "GET", "/readyz")[1] or b"{}")
        admin = subprocess.run([sys.executable, "-m", "tidegate.workers.cli", "admin", "--config",
                                os.path.join(tmp, "tidegate.toml"), "--json", "status"], capture_output=True, text=True)
        restarts = json.loads(admin.stdout or "{}").get("body", {}).get("respawns")
        root = psutil.Process(srv.proc.pid)
        rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        return {"quiet": quiet, "attacked": loud, "attacker": dict(got), "restarts": restarts,
                "ready": status.get("ready"), "rss_mb": rss / 2**20}
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--victim-requests", type=int, default=40)
    args = ap.parse_args()
    model = make_demo(os.path.join(tempfile.mkdtemp(prefix="adversary-model-"), "demo.gguf"))
    rows = []
    for name in args.attacks.split(","):
        r = run(name, model, args.victim_requests)
        rows.append((name, r))
        q, a = r["quiet"], r["attacked"]
        print(f"{name:10} victim p50 {q['p50']:7.1f} -> {a['p50']:7.1f} ms  p99 {q['p99']:7.1f} -> {a['p99']:7.1f} ms "
              f"({a['p99'] / q['p99']:.2f}x)  refused {a['refused']} failed {a['failed']}  restarts {r['restarts']}  "
              f"ready {r['ready']}  rss {r['rss_mb']:.0f} MB  attacker {r['attacker']}", flush=True)


if __name__ == "__main__":
    main()
