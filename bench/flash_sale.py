"""The seed's flash sale, open loop: background traffic x3 within 60 s, held, then back; fraud
scoring (critical) must not degrade. Runs bench/flash_sale.toml twice against fresh daemons in
the same run, shedding on (overload.shed = the defaults: critical never, standard reject,
background cached) and off (every class never shed), and prints the acceptance figures side by side:

  critical p99 during the spike / before (target <= 1.25x) and critical errors (target 0);
  every background request answered (ok, a cached approximation, or 503 + Retry-After; no error,
  none timed out); the daemon's RSS (target: under --rss-bound); seconds until each class's p99
  is back at baseline after the spike (every 5 s window within 1.25x of before's p99, or no worse
  than the worst 5 s window before the spike).

The daemon: `tidegate demo features` data and models, the LLM demo model (max_seqs 4, one llama.cpp
thread, one slot reserved for the standard support chat; fraud scoring never reaches it), one
ingress worker, API keys per class, exact and semantic cache ttl 10 s (so shed requests find stale
or approximate answers: overload.approximate 0.6), sessions for the shopping chat. Reports (JSON + PNG) go to --out.

    python bench/flash_sale.py [--duration 150] [--out bench/results/flash_sale]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers as S  # noqa: E402

from tidegate.core.base.config import toml_value  # noqa: E402
from tidegate.core.predict import demo  # noqa: E402
from tidegate.core.state.auth import hash_key  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = {"CRITICAL_KEY": ("sk-flash-critical-0123456789", "critical"),
        "STANDARD_KEY": ("sk-flash-standard-0123456789", "standard"),
        "BACKGROUND_KEY": ("sk-flash-background-0123456789", "background")}
TENANT = "shop"


def daemon(tmp: str, shed: bool) -> S.Server:
    port = S.free_port()
    root = os.path.join(tmp, "demo")
    if not os.path.exists(os.path.join(root, "tidegate.toml")):
        demo.build(root, 10000, 2000)
        from tidegate.workers import load_config
        demo.load_rows(load_config(os.path.join(root, "tidegate.toml")), root, TENANT)
    text = demo.config_text(root, "", f"127.0.0.1:{port}").replace("[inference]\nenabled = false", "[inference]")
    # one ingress worker; llama.cpp (one thread) yields the CPU it shares with the ingress worker
    # and the load generator on this 2-core box
    text = text.replace("[server]\n", "[server]\nworkers = 1\nmax_connections = 20000\n"
                                       "nice = {inference = 5, embedder = 5, views = 10}\n", 1)
    keys = [{"key_sha256": hash_key(k), "tenant": TENANT, "name": name.lower(), "class": cls}
            for name, (k, cls) in KEYS.items()]
    policy = {"critical": "never", "standard": "reject", "background": "cached"} if shed else dict.fromkeys(
        ("critical", "standard", "background"), "never")
    text = text.replace("[inference]\n", "[inference]\nmax_seqs = 4\nthreads = 1\nreserved = {standard = 1}\n"
                                         "queue_max = {critical = 256, standard = 4096, background = 4096}\n", 1)
    text += (f"\n[auth]\nkeys = {toml_value(keys)}\n[cache]\nexact_ttl = 10.0\nsemantic_ttl = 10.0\n"
             f"[overload]\nshed = {toml_value(policy)}\napproximate = 0.6\n[limits]\nkeepalive_timeout = 600.0\n"
             f'[log]\nlevel = "warning"\n')
    sub = os.path.join(tmp, "shed-on" if shed else "shed-off")
    os.makedirs(sub, exist_ok=True)
    conf = os.path.join(sub, "tidegate.toml")
    with open(conf, "w") as f:
        f.write(text.replace(f'data_dir = "{root}/data"', f'data_dir = "{sub}/data"').replace(
            f'run_dir = "{root}/run"', f'run_dir = "{sub}/run"'))
    if not os.path.exists(os.path.join(sub, "data", "features")):  # its own stores, the same feature rows
        import shutil
        shutil.copytree(os.path.join(root, "data", "features"), os.path.join(sub, "data", "features"))
    srv = S.Server("tidegate", [sys.executable, "-m", "tidegate.workers.cli", "serve", "--config", conf], port, sub)
    srv.conf = conf
    return srv


def scenario(tmp: str, port: int) -> str:
    text = open(os.path.join(HERE, "flash_sale.toml")).read().replace("http://127.0.0.1:8080",
                                                                      f"http://127.0.0.1:{port}")
    for name, (key, _) in KEYS.items():
        text = text.replace(name, key)
    path = os.path.join(tmp, f"flash_sale-{port}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def one_run(tmp: str, shed: bool, args) -> dict:
    srv = daemon(tmp, shed)
    srv.start()
    out = os.path.join(args.out, "shed-on" if shed else "shed-off")
    extra = ["--watch-pid", str(srv.proc.pid)] + (["--duration", str(args.duration)] if args.duration else [])
    try:
        return S.loadtest(srv, scenario(tmp, srv.port), out, *extra, quiet=args.quiet)
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=0, help="override the scenario's 150 s")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "flash_sale"))
    ap.add_argument("--rss-bound", type=float, default=3072, help="MiB the daemon's whole process tree may use")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    S.raise_nofile()
    tmp = tempfile.mkdtemp(prefix="tidegate-flash-")
    results = {}
    for shed in (True, False):
        print(f"=== shedding {'on' if shed else 'off'} ===", flush=True)
        results["on" if shed else "off"] = one_run(tmp, shed, args)
    print("\nacceptance (shedding on | off)")
    for label, get in (
            ("critical p99 before (ms)", lambda r: r["classes"]["critical"]["phases"]["before"]["p99_ms"]),
            ("critical p99 spike (ms)", lambda r: r["classes"]["critical"]["phases"]["spike"]["p99_ms"]),
            ("critical spike/before (<= 1.25)", lambda r: r["classes"]["critical"]["spike_p99_ratio"]),
            ("critical errors + timeouts (0)", lambda r: r["classes"]["critical"]["total"]["error"]
             + r["classes"]["critical"]["total"]["timeout"]),
            ("background errors + timeouts (0)", lambda r: r["classes"]["background"]["total"]["error"]
             + r["classes"]["background"]["total"]["timeout"]),
            ("background cached answers", lambda r: r["classes"]["background"]["total"]["cached"]),
            ("background 503 + Retry-After", lambda r: r["classes"]["background"]["total"]["rejected"]),
            ("background p99 spike (ms)", lambda r: r["classes"]["background"]["phases"]["spike"]["p99_ms"]),
            ("standard p99 spike (ms)", lambda r: r["classes"]["standard"]["phases"]["spike"]["p99_ms"]),
            (f"RSS max MiB (< {args.rss_bound:.0f})", lambda r: round(r.get("rss_max_bytes", 0) / 2**20)),
            ("critical settle s", lambda r: r["classes"]["critical"]["settle_s"]),
            ("standard settle s", lambda r: r["classes"]["standard"]["settle_s"]),
            ("background settle s", lambda r: r["classes"]["background"]["settle_s"])):
        print(f"  {label:34} {get(results['on'])!s:>12} | {get(results['off'])!s:>12}")
    print(f"reports: {args.out}/shed-on, {args.out}/shed-off (report.json, report.png)")


if __name__ == "__main__":
    main()
