"""Precision and recall of the semantic cache's hit decision (cosine threshold + verifier).

    python bench/semantic_eval.py [--threshold 0.90] [--min-overlap 0.8]

Data: every labelled set in ../shared/data/paraphrase (bench/paraphrase_sets.py: PAWS-Wiki dev,
MRPC train, the Twitter URL corpus, SICK; a missing one is named, not skipped silently) and
bench/data/gateway_pairs.tsv (pairs of our own making, in the shape of gateway traffic:
rephrasings vs changed numbers, negation, entities and roles). Pair mode: a pair is a hit when the
cosine of the WordLlama embeddings reaches the threshold and the verifier accepts it; precision =
share of hits labelled same-meaning, recall = share of same-meaning pairs hit.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from tidegate.core.cache.embedders import WordLlamaEmbedder  # noqa: E402
from tidegate.core.cache.verifier import verify  # noqa: E402

import paraphrase_sets as P  # noqa: E402

OURS = os.path.join(HERE, "data", "gateway_pairs.tsv")


def load(path: str) -> list[tuple[str, str, int]]:
    out = []
    for line in open(path, encoding="utf-8"):
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 4:
            parts = parts[1:]
        out.append((parts[0], parts[1], int(parts[2])))
    return out


def evaluate(name: str, pairs, emb, threshold: float, min_overlap: float) -> None:
    a = emb.embed([p[0] for p in pairs])
    b = emb.embed([p[1] for p in pairs])
    cos = (a * b).sum(1)
    y = np.array([p[2] for p in pairs])
    t0 = time.perf_counter()
    ok = np.array([c >= threshold and verify(p[0], p[1], min_overlap)[0] for c, p in zip(cos, pairs)])
    per_pair_us = (time.perf_counter() - t0) / len(pairs) * 1e6
    by_cos = cos >= threshold
    for label, hit in (("cosine alone", by_cos), ("cosine + verifier", ok)):
        n = int(hit.sum())
        prec = float(y[hit].mean()) if n else float("nan")
        rec = float((hit & (y == 1)).sum() / max(1, (y == 1).sum()))
        print(f"  {name:14} {label:18} hits {n:5d}  precision {prec:.3f}  recall {rec:.3f}")
    print(f"  {name:14} verifier cost {per_pair_us:.1f} us per pair")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threshold", type=float, default=0.90)
    ap.add_argument("--min-overlap", type=float, default=0.8)
    ap.add_argument("--max-pairs", type=int, default=10000, help="pairs per set at most")
    args = ap.parse_args()
    emb = WordLlamaEmbedder()
    print(f"threshold {args.threshold}, min_overlap {args.min_overlap}:")
    for name in P.SETS:
        if not P.available(name):
            print(f"  {name:14} MISSING: {P.ROOT}/{P.FILES[name]} not found (this set is not evaluated)")
            continue
        pairs = P.load(name)
        if len(pairs) > args.max_pairs:  # (a fixed sample of the larger sets)
            pairs = pairs[:: len(pairs) // args.max_pairs + 1]
        evaluate(name, pairs, emb, args.threshold, args.min_overlap)
    evaluate("gateway pairs", load(OURS), emb, args.threshold, args.min_overlap)


if __name__ == "__main__":
    main()
