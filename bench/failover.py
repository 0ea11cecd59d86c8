"""Every fault of tests/helpers/fault_provider.py against tidegate (the faulty backend first, a
healthy one second, the fault's fallback where it has one) and against the plain `openai` SDK
talking to the faulty provider with its own retries (max_retries=2: the control a user without
a gateway has). Printed per fault and side: complete answers, clean errors, hangs (no answer
within the client's timeout), truncations presented as success, attempts the provider saw per
request, and the median time to answer.

    python bench/failover.py [--requests 4] [--timeout 10] [--faults ok,503,cut:40,...]

tidegate runs with header_timeout 2, first_token_timeout 3, stall_timeout 2 (its defaults are
10 / 15 / 10: a bench of silent backends would take minutes); the SDK's own timeout is --timeout.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import openai

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers.daemon import Daemon  # noqa: E402
from helpers.fault_provider import FaultProvider  # noqa: E402

WHOLE = " ".join(f"w{i}" for i in range(60))
FAULTS = ["ok", "429-retry-after:1", "429", "500-once", "503", "reset", "silent", "slow-first:20", "cut:40",
          "stall:20", "malformed", "no-done", "context", "filter", "down"]


def gateway_models(url: str) -> list[dict]:
    out = []
    for f in FAULTS:
        second = {"url": url, "model": "ok", "prefill": True}
        m = {"name": f"g-{f}", "backends": [{"url": url, "model": f}, second], "routing": "least_loaded",
             "health_interval": 600, "header_timeout": 2, "first_token_timeout": 3, "stall_timeout": 2}
        if f == "context":  # a larger window is another model
            m["backends"], m["fallbacks"] = [{"url": url, "model": f}], ["g-big"]
        out.append(m)
    out.append({"name": "g-big", "backends": [{"url": url, "model": "ok"}], "health_interval": 600})
    return out


def one(c: openai.OpenAI, model: str, stream: bool, i: int) -> tuple[str, float]:
    """(what the client got: complete | error | hang | truncated, seconds)."""
    t0 = time.monotonic()
    msgs = [{"role": "user", "content": f"words please {i} {stream}"}]  # (a new prompt: 500-once fails each once)
    try:
        if stream:
            text = "".join(ch.choices[0].delta.content or "" for ch in
                           c.chat.completions.create(model=model, messages=msgs, stream=True) if ch.choices)
        else:
            text = c.chat.completions.create(model=model, messages=msgs).choices[0].message.content
    except openai.APITimeoutError:
        return "hang", time.monotonic() - t0
    except Exception:  # an error status, or a client that could not read what came (a broken chunk)
        return "error", time.monotonic() - t0
    return ("complete" if text == WHOLE else "truncated"), time.monotonic() - t0


def run(side: str, c: openai.OpenAI, p: FaultProvider, fault: str, model: str, n: int) -> dict:
    got, times, before = {"complete": 0, "error": 0, "hang": 0, "truncated": 0}, [], len(p.attempts)
    if fault == "down":
        p.down_until = time.monotonic() + 3.0
    for i in range(n):
        for stream in (False, True):
            what, took = one(c, model, stream, i)
            got[what] += 1
            times.append(took)
    return {**got, "attempts": (len(p.attempts) - before) / (2 * n), "median_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4, help="per fault and side, each streamed and not")
    ap.add_argument("--timeout", type=float, default=10.0, help="the clients' timeout (s): past it, a hang")
    ap.add_argument("--faults", default=",".join(FAULTS))
    args = ap.parse_args()
    p = FaultProvider()
    d = Daemon(__import__("pathlib").Path(tempfile.mkdtemp(prefix="failover-")), workers=1,
               cache={"exact_enabled": False, "semantic_enabled": False},
               inference={"enabled": True, "models": gateway_models(p.url)})
    d.start()
    try:
        via = openai.OpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key="x", max_retries=0, timeout=args.timeout)
        sdk = openai.OpenAI(base_url=f"{p.url}/v1", api_key="x", max_retries=2, timeout=args.timeout)
        print(f"{'fault':18} {'side':9} {'complete':>8} {'error':>6} {'hang':>5} {'trunc':>6} {'attempts':>8} "
              f"{'median s':>8}", flush=True)
        for fault in args.faults.split(","):
            for side, c, model in (("tidegate", via, f"g-{fault}"), ("sdk", sdk, fault)):
                r = run(side, c, p, fault, model, args.requests)
                print(f"{fault:18} {side:9} {r['complete']:8} {r['error']:6} {r['hang']:5} {r['truncated']:6} "
                      f"{r['attempts']:8.2f} {r['median_s']:8.2f}", flush=True)
    finally:
        d.stop()
        p.close()


if __name__ == "__main__":
    main()
