"""Precision and recall of the semantic cache's hit decision (cosine threshold + the decision).

    python bench/semantic_eval.py [--decision model|verifier] [--threshold 0.90] [--lookup 1000]
                                  [--embedder wordllama|minilm] [--sweep]

Data: every labelled set in ../shared/data/paraphrase (bench/paraphrase_sets.py: PAWS-Wiki dev,
MRPC train, the Twitter URL corpus, SICK; a missing one is named, not skipped silently) and
bench/data/gateway_pairs.tsv (pairs of our own making, in the shape of gateway traffic:
rephrasings vs changed numbers, negation, entities and roles). Pair mode: a pair is a hit when the
cosine of the WordLlama embeddings reaches the threshold and the decision accepts it; precision =
share of hits labelled same-meaning, recall = share of same-meaning pairs hit.

Lookup mode (--lookup N, the issue-15 measure): a daemon on its defaults (demo model, WordLlama,
the chosen decision) in one tenant; the first text of N held-out pairs is asked once to prime the cache,
then every second text is asked; a hit is right only when it returns the answer primed for its
own pair and the pair means the same. Here each query meets N near neighbours, not one.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from tidegate.core.cache.embedders import WordLlamaEmbedder, make_embedder  # noqa: E402
from tidegate.core.cache.verifier import verify  # noqa: E402

import paraphrase_sets as P  # noqa: E402
import servers as S  # noqa: E402

OURS = os.path.join(HERE, "data", "gateway_pairs.tsv")


def load(path: str) -> list[tuple[str, str, int]]:
    out = []
    for line in open(path, encoding="utf-8"):
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 4:
            parts = parts[1:]
        out.append((parts[0], parts[1], int(parts[2])))
    return out


def evaluate(name: str, pairs, emb, threshold: float, min_overlap: float, decision: str = "verifier",
             embedder: str = "wordllama") -> None:
    a = emb.embed([p[0] for p in pairs])
    b = emb.embed([p[1] for p in pairs])
    cos = (a * b).sum(1)
    y = np.array([p[2] for p in pairs])
    t0 = time.perf_counter()
    if decision == "model":
        from tidegate.core.cache.hitmodel import decide
        check = lambda a, b, c: decide(a, b, c, embedder)[0]  # noqa: E731
    else:
        check = lambda a, b, c: verify(a, b, min_overlap)[0]  # noqa: E731
    ok = np.array([c >= threshold and check(p[0], p[1], float(c)) for c, p in zip(cos, pairs)])
    per_pair_us = (time.perf_counter() - t0) / len(pairs) * 1e6
    by_cos = cos >= threshold
    for label, hit in (("cosine alone", by_cos), (f"cosine + {decision}", ok)):
        n = int(hit.sum())
        prec = float(y[hit].mean()) if n else float("nan")
        rec = float((hit & (y == 1)).sum() / max(1, (y == 1).sum()))
        print(f"  {name:14} {label:18} hits {n:5d}  precision {prec:.3f}  recall {rec:.3f}")
    print(f"  {name:14} decision cost {per_pair_us:.1f} us per pair")
    return cos, y


def sweep(name: str, cos: np.ndarray, y: np.ndarray, floor: float = 0.95) -> None:
    """The cosine threshold alone: the lowest one whose precision reaches floor, and its recall."""
    for t in np.arange(0.5, 1.0, 0.01):
        hit = cos >= t
        if hit.sum() >= 5 and y[hit].mean() >= floor:
            rec = float((hit & (y == 1)).sum() / max(1, (y == 1).sum()))
            print(f"  {name:14} cosine alone: threshold {t:.2f} reaches precision {y[hit].mean():.3f}, recall {rec:.3f}")
            return
    print(f"  {name:14} cosine alone: no threshold reaches precision {floor}")


def _chat(port: int, text: str, max_tokens: int) -> tuple[str, str, float]:
    """(answer text, x-tidegate-cache, seconds) of one chat completion through the gateway."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": "tidegate-demo", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
        "temperature": 0}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    body = json.loads(r.read())
    took = time.perf_counter() - t0
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"{r.status}: {body}")
    return body["choices"][0]["message"]["content"], r.getheader("x-tidegate-cache", ""), took


def _wait(port: int, conf: str = "", timeout: float = 120.0) -> None:
    """Until the gateway answers and (conf given) every worker is ready: the embedder loads (and
    converts MiniLM on a fresh data dir) after the gateway already answers, and what it is sent
    before then is a miss, never stored."""
    import subprocess
    deadline = time.time() + timeout
    while True:
        try:
            _chat(port, "ping", 1)
            if conf:
                r = subprocess.run([sys.executable, "-m", "tidegate.workers.cli", "admin", "--config", conf, "--json",
                                    "status"], capture_output=True, text=True, timeout=30)
                st = json.loads(r.stdout)["body"]
                if st["workers_ready"] < st["workers_expected"]:
                    raise RuntimeError("workers starting")
            return
        except (OSError, RuntimeError, ValueError, KeyError):
            if time.time() > deadline:
                raise
            time.sleep(0.3)


def lookup_mode(name: str, pairs, port: int, max_tokens: int = 8) -> None:
    """Through a running gateway, one tenant and one namespace: every pair's first text is asked
    once (the model's answer is cached), then every second text. A semantic hit is right only
    when it returns the answer cached for its own pair and the pair means the same; a hit on
    another pair's entry, or on its own entry when the pair differs in meaning, is wrong."""
    answers = [_chat(port, a, max_tokens)[0] for a, _, _ in pairs]
    right = wrong_meaning = wrong_entry = exact = 0
    hit_s = []
    for (a, b, y), own in zip(pairs, answers):
        text, kind, took = _chat(port, b, max_tokens)
        if kind == "exact":  # (the same text as a primed one: not the semantic decision's)
            exact += 1
            continue
        if kind != "semantic":
            continue
        hit_s.append(took)
        if text != own:
            wrong_entry += 1
        elif y == 1:
            right += 1
        else:
            wrong_meaning += 1
    hits = right + wrong_meaning + wrong_entry
    pos = sum(1 for p in pairs if p[2] == 1 and p[0] != p[1])
    prec = right / hits if hits else float("nan")
    lat = (f"hit latency over HTTP p50 {np.percentile(hit_s, 50) * 1000:.1f} ms p99 "
           f"{np.percentile(hit_s, 99) * 1000:.1f} ms" if hit_s else "no hits")
    print(f"  {name:14} lookup mode        hits {hits:5d}  precision {prec:.3f}  recall {right / max(1, pos):.3f}  "
          f"wrong: {wrong_meaning} meaning, {wrong_entry} another pair's entry; {exact} exact; {lat}; "
          f"{_embedder_facts(port)}", flush=True)


def _embedder_facts(port: int) -> str:
    """The embedder process's RSS and embeddings/s (from /metrics: texts over seconds embedding)."""
    import psutil
    rss = [p.memory_info().rss for p in psutil.process_iter(["cmdline"])
           if "tidegate: embedder" in " ".join(p.info["cmdline"] or [])]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    val = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
           if line.startswith(("tidegate_embed_texts_total ", "tidegate_embed_seconds_total "))}
    rate = val.get("tidegate_embed_texts_total", 0) / max(1e-9, val.get("tidegate_embed_seconds_total", 0))
    return f"embedder RSS {max(rss, default=0) / 2**20:.0f} MiB, {rate:.0f} embeddings/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threshold", type=float, default=0.0, help="0 = the embedder's calibrated floor")
    ap.add_argument("--min-overlap", type=float, default=0.8)
    ap.add_argument("--max-pairs", type=int, default=10000, help="pairs per set at most (pair mode)")
    ap.add_argument("--decision", choices=["verifier", "model"], default="model",
                    help="the hit decision (in lookup mode the daemon's cache.semantic_decision)")
    ap.add_argument("--lookup", type=int, default=1000, metavar="N",
                    help="lookup mode over HTTP on N held-out pairs per set against a daemon started here "
                         "on its defaults (0 = pair mode only)")
    ap.add_argument("--embedder", choices=["wordllama", "minilm"], default="wordllama")
    ap.add_argument("--sweep", action="store_true", help="pair mode: the cosine threshold alone at precision 0.95")
    ap.add_argument("--lookup-only", action="store_true", help="skip pair mode")
    args = ap.parse_args()
    emb = WordLlamaEmbedder() if args.embedder == "wordllama" else \
        make_embedder("minilm", data_dir=tempfile.mkdtemp(prefix="semantic-eval-"))
    if not args.threshold:
        from tidegate.core.cache.hitmodel import model
        from tidegate.core.cache.semantic_store import RULES_FLOOR
        floor = model(args.embedder).cos_floor if args.decision == "model" else RULES_FLOOR[args.embedder]
        print(f"threshold 0: the embedder's floor, {floor}")
    pair_threshold = args.threshold or floor
    print(f"embedder {args.embedder}")
    print(f"pair mode, decision {args.decision}, threshold {args.threshold}, min_overlap {args.min_overlap}:")
    sets = {}
    for name in P.SETS:
        if not P.available(name):
            print(f"  {name:14} MISSING: {P.ROOT}/{P.FILES[name]} not found (this set is not evaluated)")
            continue
        pairs = P.load(name)
        sets[name] = [p for p in pairs if P.split_of(p[0], p[1]) == "test"]
        if args.lookup_only:
            continue
        if len(pairs) > args.max_pairs:  # (a fixed sample of the larger sets)
            pairs = pairs[:: len(pairs) // args.max_pairs + 1]
        cos, y = evaluate(name, pairs, emb, pair_threshold, args.min_overlap, args.decision, args.embedder)
        if args.sweep:
            sweep(name, cos, y)
    if not args.lookup_only:
        cos, y = evaluate("gateway pairs", load(OURS), emb, pair_threshold, args.min_overlap, args.decision, args.embedder)
        if args.sweep:
            sweep("gateway pairs", cos, y)
    if not args.lookup:
        return
    print(f"\nlookup mode over HTTP, decision {args.decision}, threshold {args.threshold}, {args.lookup} held-out "
          f"pairs per set:")
    for name, pairs in sets.items():
        tmp = tempfile.mkdtemp(prefix="tidegate-semantic-")
        extra = (f'[cache]\nsemantic_decision = "{args.decision}"\nsemantic_threshold = {args.threshold}\n'
                 f'embedder = "{args.embedder}"\n')
        srv = S.tidegate(tmp, workers=1, inference=True, extra=extra).start()  # a fresh cache per set
        try:
            _wait(srv.port, os.path.join(tmp, "tidegate.toml"))
            step = max(1, len(pairs) // args.lookup)
            lookup_mode(name, pairs[::step][:args.lookup], srv.port)
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
