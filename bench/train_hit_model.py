"""Train a learned hit decision (bench/hit_model.py; issue 15, in progress) on the labelled
paraphrase sets in ../shared (read there; bench/paraphrase_sets.py), and report it on their
held-out splits. --write saves it under bench/.cache (the daemon does not use it yet).

    python bench/train_hit_model.py [--precision 0.97] [--write]

Each set's "train" split fits a weighted logistic regression over hit_model.features
(every set weighs the same, positives and negatives alike), then the decision threshold is the
lowest probability at which every set's train split keeps the precision asked for. The "test"
splits, never seen by the fit nor the threshold, are reported per set: pair mode (each pair
decided alone).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import paraphrase_sets as P  # noqa: E402

from tidegate.core.cache.embedders import WordLlamaEmbedder  # noqa: E402
from hit_model import MODEL_PATH, features, fit_logistic  # noqa: E402

CAP = 6000  # pairs per set and split (the Twitter set has 42k)


def featurize(pairs, emb) -> tuple[np.ndarray, np.ndarray]:
    a = emb.embed([p[0] for p in pairs])
    b = emb.embed([p[1] for p in pairs])
    cos = (a * b).sum(1)
    x = np.stack([features(p[0], p[1], float(c)) for p, c in zip(pairs, cos)])
    return x, np.array([p[2] for p in pairs], dtype=np.float64)


def precision_recall(p: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float, int]:
    hit = p >= t
    n = int(hit.sum())
    return (float(y[hit].mean()) if n else 1.0), float((hit & (y == 1)).sum() / max(1, (y == 1).sum())), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", type=float, default=0.97, help="precision every train split must keep")
    ap.add_argument("--write", action="store_true", help=f"save the model to {MODEL_PATH}")
    args = ap.parse_args()
    emb = WordLlamaEmbedder()
    rng = np.random.default_rng(0)
    data = {}
    for name in P.SETS:
        if not P.available(name):
            print(f"{name}: missing ({P.ROOT}): not used")
            continue
        for split in ("train", "test"):
            pairs = P.load(name, split)
            if len(pairs) > CAP:
                pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), CAP, replace=False))]
            data[(name, split)] = featurize(pairs, emb)
    names = sorted({n for n, _ in data})
    xs, ys, ws = [], [], []
    for n in names:
        x, y = data[(n, "train")]
        pos = max(1, int(y.sum()))
        w = np.where(y == 1, 0.5 / pos, 0.5 / max(1, len(y) - pos)) * 1000.0
        xs.append(x), ys.append(y), ws.append(w)
    t0 = time.perf_counter()
    model = fit_logistic(np.concatenate(xs), np.concatenate(ys), np.concatenate(ws))
    fit_s = time.perf_counter() - t0
    # the lowest threshold at which every train split keeps the precision
    grid = np.linspace(0.5, 0.999, 500)
    probs = {n: model.prob_of(data[(n, "train")][0]) for n in names}
    ok = [t for t in grid if all(precision_recall(probs[n], data[(n, "train")][1], t)[0] >= args.precision
                                 for n in names)]
    model.threshold = float(ok[0]) if ok else 0.999
    print(f"fit in {fit_s:.2f} s; threshold {model.threshold:.3f} (train precision >= {args.precision} on every set)")
    report = {}
    for n in names:
        x, y = data[(n, "test")]
        p = model.prob_of(x)
        prec, rec, hits = precision_recall(p, y, model.threshold)
        cos_only = precision_recall(x[:, 1], y, 0.90)
        report[n] = {"precision": round(prec, 3), "recall": round(rec, 3), "hits": hits, "pairs": len(y)}
        print(f"  {n:8} test: precision {prec:.3f} recall {rec:.3f} ({hits} hits of {len(y)} pairs); "
              f"cosine >= 0.90 alone: precision {cos_only[0]:.3f} recall {cos_only[1]:.3f}")
    model.info = {"trained_on": names, "train_precision": args.precision, "test_pair_mode": report}
    if args.write:
        model.save()
        print(f"wrote {MODEL_PATH}")


if __name__ == "__main__":
    main()
