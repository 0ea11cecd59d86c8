"""Feature lookups and predictions through tidegate, with Feast's feature server side by side.

1. lookup: one user's 30 float32 features. tidegate GET /v1/features/user/ID (the LMDB registry)
   vs Feast's POST /get-online-features (`feast serve`, one worker, SQLite online store) on the
   same rows; then tidegate's Redis view (the merchants) vs Feast on a Redis online store.
2. predict: the demo's fraud model (64 inputs: 2 from the request, 30 user features from the
   registry, 30 merchant features from a real Redis, 2 live event-log views; logistic regression)
   at moderate load (p50 / p99), then at 1,000 connections with micro-batching (max_batch 64)
   and without (max_batch 1).
3. every source down: Redis stopped, ids nobody loaded: only defaults, latency vs the critical
   deadline (2 ms).

One ingress worker per server pinned to CPU 0, wrk on CPU 1; random ids per request (Lua);
medians over rounds, ratios printed. Feast runs from its own venv (made here on first use:
pip install feast into ~/.cache/tidegate-bench/feast-venv).

    python bench/predict_bench.py [--duration 8] [--rounds 3] [--users 10000]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load_http as L  # noqa: E402
import load_state  # noqa: E402
import servers as S  # noqa: E402

from tidegate.core.predict import demo  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.expanduser("~/.cache/tidegate-bench/feast-venv")
FEAST_PY = os.path.join(VENV, "bin", "python")


def lookup_redis(args, tg, tmp, rurl, scripts, out) -> None:
    """tidegate's Redis view (the merchants) vs Feast on a Redis online store, the same Redis."""
    # Lua's %d takes the first argument: swap so the merchant id comes first in these scripts
    for name in ("lookup-redis", "feast-redis"):
        text = open(scripts[name]).read().replace("]], u, m)", "]], m, u)")
        with open(scripts[name], "w") as f:
            f.write(text)
    feast = feast_server(tmp, os.path.join(tmp, "demo", "merchants.csv"), "redis", rurl)
    feast.start()
    time.sleep(3)
    try:
        runs = {"tidegate lookup (redis view)": (tg.port, scripts["lookup-redis"]),
                "feast lookup (redis)": (feast.port, scripts["feast-redis"])}
        for conns in (args.moderate, 64):
            med = rounds(runs, args.rounds, args.duration, conns)
            table(f"one merchant's 30 features from Redis, {conns} connections (medians of {args.rounds})", med)
            out[f"lookup-redis/c{conns}"] = med
            t, f = med["tidegate lookup (redis view)"], med["feast lookup (redis)"]
            print(f"tidegate / feast: throughput {t['rps'] / f['rps']:.1f}x, p99 {t['p99_ms'] / f['p99_ms']:.2f}x "
                  f"(lower is better), p50 {t['p50_ms'] / f['p50_ms']:.2f}x")
    finally:
        feast.stop()


def lua(path: str, body: str | None, n_users: int, n_merchants: int, method: str = "POST") -> str:
    """A wrk script: random user (u%d) and merchant (m%d) ids in the path or body of every request;
    formats are Lua long strings, so JSON needs no escaping."""
    fmt_body = f"string.format([[{body}]], u, m)" if body is not None else "nil"
    return (f'wrk.method = "{method}"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"math.randomseed(os.time())\nrequest = function()\n"
            f"  local u = math.random(0, {n_users - 1}); local m = math.random(0, {n_merchants - 1})\n"
            f"  return wrk.format(nil, string.format([[{path}]], u, m), nil, {fmt_body})\nend\n")


def ensure_feast() -> None:
    if os.path.exists(os.path.join(VENV, "bin", "feast")):
        return
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([FEAST_PY, "-m", "pip", "install", "-q", "feast[redis]"], check=True)


def redis_server(tmp: str):
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from helpers.redis_server import redis_binary
    port = S.free_port()
    proc = subprocess.Popen(S.pinned([redis_binary(), "--port", str(port), "--save", "", "--appendonly", "no",
                                      "--dir", tmp], S.CLIENT_CPU), stdout=subprocess.DEVNULL)
    S.wait_port(port)
    return proc, f"redis://127.0.0.1:{port}/0"


def tidegate_demo(tmp: str, redis_url: str, users: int, merchants: int, max_batch: int,
                  deadline: float = 0.0) -> S.Server:
    """The demo's daemon; deadline > 0 replaces every class's Redis deadline (throughput runs)."""
    port = S.free_port()
    root = os.path.join(tmp, "demo")
    if not os.path.exists(os.path.join(root, "tidegate.toml")):
        demo.build(root, users, merchants, redis_url, bind=f"127.0.0.1:{port}")
        from tidegate.workers import load_config
        demo.load_rows(load_config(os.path.join(root, "tidegate.toml")), root)
    text = demo.config_text(root, redis_url, f"127.0.0.1:{port}")
    data = os.path.join(root, "data")
    if max_batch != 64:  # a second daemon beside the first: its own stores, the same registry rows
        data = os.path.join(tmp, f"data-b{max_batch}")
        shutil.rmtree(data, ignore_errors=True)
        os.makedirs(data)
        shutil.copytree(os.path.join(root, "data", "features"), os.path.join(data, "features"))
        text = text.replace(f"data_dir = \"{root}/data\"", f"data_dir = \"{data}\"").replace(
            f"run_dir = \"{root}/run\"", f"run_dir = \"{tmp}/run-b{max_batch}\"")
    text = text.replace("[server]\n", "[server]\nworkers = 1\nmax_connections = 20000\n", 1)
    text = text.replace("[predict]\n", f"[predict]\nmax_batch = {max_batch}\n", 1)
    if deadline:
        text = text.replace("[features]\n", f"[features]\ndeadline = {{critical = {deadline}, standard = {deadline}, "
                                               f"background = {deadline}}}\n", 1)
    text += '\n[limits]\nkeepalive_timeout = 600.0\n[log]\nlevel = "warning"\n'
    conf = os.path.join(tmp, f"tidegate-b{max_batch}.toml")
    with open(conf, "w") as f:
        f.write(text)
    return S.Server("tidegate", [sys.executable, "-m", "tidegate.workers.cli", "serve", "--config", conf], port, tmp,
                    worker_match="tidegate: ingress 0")


def post_events(port: int, n_users: int) -> None:
    """Live event counts for every 7th user, so the event-log source has rows to read."""
    import urllib.request
    evs = [{"type": "txn", "key": f"u{i}", "payload": {"amount": 10 + i % 50}} for i in range(0, n_users, 7)]
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/events", json.dumps(evs).encode(),
                                                  {"Content-Type": "application/json"}), timeout=30).read()
    time.sleep(2)  # the view builder folds them in


def feast_server(tmp: str, users_csv: str, store: str, redis_url: str = "") -> S.Server:
    repo = os.path.join(tmp, f"feast-{store}")
    subprocess.run([FEAST_PY, os.path.join(HERE, "feast_peer.py"), repo, users_csv, store, redis_url], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = S.free_port()
    cmd = [os.path.join(VENV, "bin", "feast"), "serve", "-p", str(port), "--workers", "1", "--no-access-log",
           "--max-requests", "1000000000", "--keep-alive-timeout", "600", "--registry_ttl_sec", "3600"]
    srv = S.Server(f"feast-{store}", cmd, port, repo)
    return srv


def rounds(label_runs: dict, rounds_n: int, duration: int, conns: int) -> dict:
    """label -> (port, script); alternate them round by round; medians."""
    res: dict = {k: [] for k in label_runs}
    for port, script in label_runs.values():  # warm up (connections, pools, caches); not counted
        L.wrk(port, "/", conns, 2, script)
    for rnd in range(rounds_n):
        for label, (port, script) in label_runs.items():
            r = L.wrk(port, "/", conns, duration, script)
            res[label].append(r)
            print(f"  round {rnd + 1} c={conns:<5} {label:28} {r['rps']:>9.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
                  f"p99 {r['p99_ms']:6.2f} ms  non-2xx {r['non2xx']} {r['errors']}", flush=True)
    return {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p50_ms", "p99_ms")} | {
        "non2xx": sum(r["non2xx"] for r in v)} for k, v in res.items()}


def table(title: str, med: dict) -> None:
    print(f"\n{title}")
    print(f"{'':30} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for k, v in med.items():
        print(f"{k:30} {v['rps']:>9.0f} {v['p50_ms']:>8.2f} {v['p99_ms']:>8.2f} {v['non2xx']:>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--users", type=int, default=10000)
    ap.add_argument("--merchants", type=int, default=2000)
    ap.add_argument("--moderate", type=int, default=8, help="connections for the moderate-load latency")
    ap.add_argument("--many", type=int, default=1000, help="connections for the throughput runs")
    ap.add_argument("--skip-feast", action="store_true")
    ap.add_argument("--throughput-deadline", type=float, default=1.0,
                    help="Redis deadline (s) for the throughput runs: long enough that a saturated loop reads every row")
    ap.add_argument("--parts", default="lookup,lookup-redis,predict,down", help="which parts to run (comma-separated)")
    args = ap.parse_args()
    S.ensure_tools("wrk")
    S.raise_nofile()
    if not args.skip_feast:
        ensure_feast()
    tmp = tempfile.mkdtemp(prefix="tidegate-predict-")
    rproc, rurl = redis_server(tmp)
    nu, nm = args.users, args.merchants
    feats = ",".join(f'"user_fv:u{i}"' for i in range(30))
    mfeats = ",".join(f'"merchant_fv:m{i}"' for i in range(30))
    scripts = {}
    for name, path, body, method in (
            ("lookup", "/v1/features/user/u%d", None, "GET"),
            ("feast", "/get-online-features", '{"features":[' + feats + '],"entities":{"user":["u%d"]}}', "POST"),
            ("lookup-redis", "/v1/features/merchant/m%d", None, "GET"),
            ("feast-redis", "/get-online-features", '{"features":[' + mfeats + '],"entities":{"merchant":["m%d"]}}',
             "POST"),
            ("fraud", "/v1/predict/fraud", '{"entities":{"user":"u%d","merchant":"m%d"},'
                                           '"features":{"amount":120.5,"hour":3}}', "POST"),
            ("down", "/v1/predict/fraud", '{"entities":{"user":"nobody%d","merchant":"none%d"},'
                                          '"features":{"amount":120.5,"hour":3}}', "POST")):
        scripts[name] = os.path.join(tmp, f"{name}.lua")
        with open(scripts[name], "w") as f:
            f.write(lua(path, body, nu, nm, method))
    tg = tidegate_demo(tmp, rurl, nu, nm, 64)
    out: dict = {}
    try:
        tg.start()
        post_events(tg.port, nu)
        parts = args.parts.split(",")
        # 1. lookups
        runs = {"tidegate lookup (registry)": (tg.port, scripts["lookup"])}
        feast = None
        if "lookup" not in parts:
            runs = {}
        if runs and not args.skip_feast:
            feast = feast_server(tmp, os.path.join(tmp, "demo", "users.csv"), "sqlite")
            feast.start()
            time.sleep(3)
            runs["feast lookup (sqlite)"] = (feast.port, scripts["feast"])
        for conns in (args.moderate, 64) if runs else ():
            med = rounds(runs, args.rounds, args.duration, conns)
            table(f"one user's 30 features, {conns} connections (medians of {args.rounds})", med)
            out[f"lookup/c{conns}"] = med
            if feast:
                t, f = med["tidegate lookup (registry)"], med["feast lookup (sqlite)"]
                print(f"tidegate / feast: throughput {t['rps'] / f['rps']:.1f}x, p99 {t['p99_ms'] / f['p99_ms']:.2f}x "
                      f"(lower is better), p50 {t['p50_ms'] / f['p50_ms']:.2f}x")
        if feast:
            feast.stop()
        if "lookup-redis" in parts and not args.skip_feast:
            lookup_redis(args, tg, tmp, rurl, scripts, out)
        # 2. predictions at moderate load, then many connections batched
        if "predict" in parts:
            predict_part(args, tg, tmp, rurl, scripts, out)
        tg.stop()
        # 3. every source down
        if "down" in parts:
            tg = tidegate_demo(tmp, rurl, nu, nm, 64)
            tg.start()
            rproc.kill()
            med = rounds({"fraud, every source down": (tg.port, scripts["down"])}, args.rounds, args.duration,
                         args.moderate)
            table("fraud prediction with Redis stopped and ids nobody loaded (only defaults)", med)
            print(f"p99 {med['fraud, every source down']['p99_ms']:.2f} ms vs the critical deadline 2 ms")
            out["fraud/down"] = med
    finally:
        tg.stop()
        rproc.kill()
    print(json.dumps(out))
    shutil.rmtree(tmp, ignore_errors=True)


NAMES = ("predict_requests_total", "predict_batches_total", "predict_defaulted_total", "redis_reads_total",
         "redis_late_total", "redis_breaker_opened_total")


def shares(label: str, before: dict, after: dict) -> None:
    d = {n: after[n] - before[n] for n in NAMES}
    req = d["predict_requests_total"] or 1
    print(f"{label}: mean batch {req / (d['predict_batches_total'] or 1):.1f}, inputs defaulted "
          f"{d['predict_defaulted_total'] / req:.2f} of 64 per prediction, Redis rows read in time "
          f"{d['redis_reads_total'] / req:.1%}, late reads {d['redis_late_total']:.0f}, breaker opened "
          f"{d['redis_breaker_opened_total']:.0f}x")


def predict_part(args, tg, tmp, rurl, scripts, out) -> None:
    """Moderate-load latency (the demo's own deadlines), then throughput at many connections:
    batched and unbatched daemons side by side (both on CPU 0, loaded one at a time, alternated
    round by round) with a Redis deadline a saturated loop can meet (--throughput-deadline), so
    both really read all three sources; the share read in time is printed."""
    before = load_state.metric_counts(tg.port, NAMES)
    med = rounds({"fraud (3 sources, 64 inputs)": (tg.port, scripts["fraud"])}, args.rounds, args.duration,
                 args.moderate)
    shares("moderate load, critical deadline 2 ms", before, load_state.metric_counts(tg.port, NAMES))
    table(f"fraud prediction, {args.moderate} connections", med)
    out["fraud/moderate"] = med
    tg.stop()
    tg = tidegate_demo(tmp, rurl, args.users, args.merchants, 64, args.throughput_deadline)
    tg.start()
    tg1 = tidegate_demo(tmp, rurl, args.users, args.merchants, 1, args.throughput_deadline)
    tg1.start()
    post_events(tg1.port, args.users)
    names = NAMES
    try:
        before = {k: load_state.metric_counts(s.port, names) for k, s in (("64", tg), ("1", tg1))}
        med = rounds({"fraud, max_batch 64": (tg.port, scripts["fraud"]),
                      "fraud, max_batch 1": (tg1.port, scripts["fraud"])}, args.rounds, args.duration, args.many)
        after = {k: load_state.metric_counts(s.port, names) for k, s in (("64", tg), ("1", tg1))}
    finally:
        tg1.stop()
        tg.stop()
    for k in ("64", "1"):
        shares(f"max_batch {k}", before[k], after[k])
    table(f"fraud prediction, {args.many} connections", med)
    print(f"micro-batching: {med['fraud, max_batch 64']['rps'] / med['fraud, max_batch 1']['rps']:.2f}x "
          "the unbatched throughput")
    out["fraud/many"] = med


if __name__ == "__main__":
    main()
