"""The semantic cache filling over time: hit rate and wrong-hit rate per 500 queries of a stream
in which each intent recurs reworded, as the verifier promotes and tightens (issue 28).

    python bench/semantic_fill.py [--queries 5000] [--intents 400] [--embedder minilm|wordllama]

Data: the Twitter URL corpus in ../shared (read there): tweets that a human labelled as saying
the same as a news headline form one intent (the headline and its tweets: real, noisy rewordings
nobody here wrote), from the pairs the hit model was not trained on (the "test" split). The
stream draws intents by a Zipf law (s = 1: a few are asked often, most rarely) and a wording of
the intent uniformly.

The model behind the gateway is the fault provider's "intent" model (tests/helpers): it answers
each text with its intent's headline, so an answer says what was asked: a semantic hit is wrong
when its answer is another intent's. The random-weight demo model cannot judge (its answers to
two rewordings differ by construction): the verifier uses the answer-similarity path (answers
compared: the same text, or embeddings at semantic_answer_agreement), never the model as judge.

Runs side by side, each on a fresh daemon and cache: verification on (near-misses verified,
every 20th hit audited) and off (the static decision alone). Prints per 500 queries: semantic
hits (and their share of the queries the exact cache did not answer: a text asked again after a
semantic hit is not in the exact cache), exact hits, wrong semantic hits, promoted hits, audits;
then the totals.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import random
import sys
import tempfile
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import paraphrase_sets as P  # noqa: E402

from helpers.daemon import Daemon  # noqa: E402
from helpers.fault_provider import FaultProvider  # noqa: E402


def intents(n: int, rng: random.Random) -> list[list[str]]:
    """n intents of 3 or more wordings (the headline first), from the held-out Twitter pairs."""
    cl = defaultdict(list)
    for a, b, y in P.load("twitter", "test"):
        if y == 1 and b != a and b not in cl[a]:
            cl[a].append(b)
    groups = [[a, *bs] for a, bs in cl.items() if len(bs) >= 2]
    rng.shuffle(groups)
    return groups[:n]


def metrics(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("tidegate_semantic_")}


def run(label: str, groups, stream, embedder: str, verify: str) -> None:
    p = FaultProvider()
    p.answers = {w: f"About: {g[0]}" for g in groups for w in g}
    model = {"name": "assist", "backends": [{"url": p.url, "model": "intent"}], "health_interval": 600}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="semantic-fill-"))
    d = Daemon(tmp, workers=1, cache={"embedder": embedder, "semantic_verify": verify, "semantic_timeout": 1.0},
               inference={"enabled": True, "models": [model]}).start()
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    print(f"\n{label}: embedder {embedder}, semantic_verify {verify}")
    print(f"  {'queries':>13} {'new texts':>9} {'semantic':>9} {'% not exact':>11} {'exact':>6} {'wrong':>6} "
          f"{'wrong %':>8} {'promoted':>9} {'audits':>7}")
    tot = {"semantic": 0, "exact": 0, "wrong": 0, "new": 0}
    seen: set[str] = set()
    win = dict(tot)
    last = metrics(d.port)
    try:
        for i, (gi, text) in enumerate(stream, 1):
            conn.request("POST", "/v1/chat/completions", json.dumps({
                "model": "assist", "messages": [{"role": "user", "content": text}], "max_tokens": 32,
                "temperature": 0}), {"Content-Type": "application/json"})
            r = conn.getresponse()
            body = json.loads(r.read())
            kind = r.getheader("x-tidegate-cache", "")
            win["new"] += text not in seen
            seen.add(text)
            if kind in ("semantic", "exact"):
                win[kind] += 1
                if kind == "semantic" and body["choices"][0]["message"]["content"] != f"About: {groups[gi][0]}":
                    win["wrong"] += 1
            if i % 500 == 0:
                m = metrics(d.port)
                promoted = m.get("tidegate_semantic_promoted_hits_total", 0) - last.get("tidegate_semantic_promoted_hits_total", 0)
                audits = m.get("tidegate_semantic_audits_total", 0) - last.get("tidegate_semantic_audits_total", 0)
                wrong_pct = 100.0 * win["wrong"] / max(1, win["semantic"])
                print(f"  {i - 499:>6}-{i:<6} {win['new']:>9} {win['semantic']:>9} "
                      f"{100 * win['semantic'] / max(1, 500 - win['exact']):>10.1f}% {win['exact']:>6} {win['wrong']:>6} "
                      f"{wrong_pct:>7.1f}% {promoted:>9.0f} {audits:>7.0f}", flush=True)
                for k in tot:
                    tot[k] += win[k]
                win, last = dict.fromkeys(win, 0), m
        n = len(stream)
        print(f"  total: semantic hits {tot['semantic']} ({100 * tot['semantic'] / n:.1f}% of queries, "
              f"{100 * tot['semantic'] / max(1, n - tot['exact']):.1f}% of those the exact cache did not answer), exact "
              f"{tot['exact']} ({100 * tot['exact'] / n:.1f}%), wrong semantic hits {tot['wrong']} "
              f"({100 * tot['wrong'] / max(1, tot['semantic']):.2f}% of semantic hits)")
    finally:
        conn.close()
        d.stop()
        p.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--intents", type=int, default=400)
    ap.add_argument("--embedder", choices=["minilm", "wordllama"], default="minilm")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    groups = intents(args.intents, rng)
    weights = [1.0 / (k + 1) for k in range(len(groups))]
    stream = []
    for _ in range(args.queries):
        gi = rng.choices(range(len(groups)), weights)[0]
        stream.append((gi, rng.choice(groups[gi])))
    distinct = len({t for _, t in stream})
    print(f"{len(groups)} intents ({sum(map(len, groups))} wordings), {len(stream)} queries, {distinct} distinct texts "
          f"(a text asked again is an exact hit at best)")
    for verify in ("on", "off"):
        run(f"verification {verify}", groups, stream, args.embedder, verify)


if __name__ == "__main__":
    main()
