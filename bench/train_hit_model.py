"""Train the semantic cache's learned hit decision (core/cache/hit_model.json, read by
core/cache/hitmodel.py) on the labelled paraphrase sets in ../shared (read there, never copied:
bench/paraphrase_sets.py), and report it per set on their held-out splits.

    python bench/train_hit_model.py [--precision 0.96] [--write]

Each set's "train" split is cut again: three quarters fit gradient-boosted trees (scikit-learn,
the bench extra; every set weighs the same, positives and negatives alike; pairs with a hard
conflict are left out, since those are vetoed before the trees are asked), the last quarter
picks the decision threshold: the lowest probability at which every set keeps the precision
asked for. The "test" splits, seen by neither, are reported per set in pair mode (each pair
decided alone, after the verifier's hard conflicts); bench/semantic_eval.py --lookup measures
lookup mode through the gateway. --write saves the model for the package.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import paraphrase_sets as P  # noqa: E402

from tidegate.core.cache.embedders import WordLlamaEmbedder  # noqa: E402
from tidegate.core.cache.hitmodel import MODEL_PATH, HitModel, features  # noqa: E402
from tidegate.core.cache.verifier import conflicts  # noqa: E402

CAP = 8000  # pairs per set and split at most (the Twitter set has 42k)


def featurize(pairs, emb) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, hard conflict) of each pair."""
    a = emb.embed([p[0] for p in pairs])
    b = emb.embed([p[1] for p in pairs])
    cos = (a * b).sum(1)
    x = np.array([features(p[0], p[1], float(c)) for p, c in zip(pairs, cos)])
    hard = np.array([bool(conflicts(p[0], p[1])) for p in pairs])
    return x, np.array([p[2] for p in pairs], dtype=np.float64), hard


def precision_recall(hit: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    n = int(hit.sum())
    return (float(y[hit].mean()) if n else 1.0), float((hit & (y == 1)).sum() / max(1, (y == 1).sum())), n


def export(gbm) -> HitModel:
    """sklearn's HistGradientBoostingClassifier as plain arrays (no sklearn needed to serve it)."""
    trees = []
    for (pred,) in gbm._predictors:
        n = pred.nodes
        trees.append({"feature": n["feature_idx"].tolist(), "threshold": n["num_threshold"].tolist(),
                      "left": n["left"].tolist(), "right": n["right"].tolist(), "leaf": n["is_leaf"].astype(int).tolist(),
                      "value": n["value"].tolist()})
    return HitModel(float(np.ravel(gbm._baseline_prediction)[0]), trees, 0.5)


def main() -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", type=float, default=0.96, help="precision every set's tuning quarter must keep")
    ap.add_argument("--write", action="store_true", help=f"save the model to {MODEL_PATH}")
    ap.add_argument("--min-cos", type=float, default=0.0,
                    help="fit and tune on pairs at this cosine or more only (the trees only ever see neighbours "
                         "above the cache's threshold)")
    ap.add_argument("--report-cos", type=float, default=0.90, help="the cosine threshold the test report applies")
    args = ap.parse_args()
    emb = WordLlamaEmbedder()
    rng = np.random.default_rng(0)
    data = {}
    for name in P.SETS:
        if not P.available(name):
            print(f"{name}: MISSING ({P.ROOT}/{P.FILES[name]}): not used")
            continue
        for split in ("train", "test"):
            pairs = P.load(name, split)
            if len(pairs) > CAP:
                pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), CAP, replace=False))]
            if split == "train":
                tune = [hashlib.sha256((a + "\n" + b).encode()).digest()[1] < 64 for a, b, _ in pairs]
                data[(name, "fit")] = featurize([p for p, t in zip(pairs, tune) if not t], emb)
                data[(name, "tune")] = featurize([p for p, t in zip(pairs, tune) if t], emb)
            else:
                data[(name, "test")] = featurize(pairs, emb)
    names = sorted({n for n, _ in data})
    xs, ys, ws = [], [], []
    for n in names:
        x, y, hard = data[(n, "fit")]
        keep = ~hard & (x[:, 0] >= args.min_cos)  # (a hard conflict is vetoed before the trees are asked)
        x, y = x[keep], y[keep]
        pos = max(1, int(y.sum()))
        xs.append(x), ys.append(y), ws.append(np.where(y == 1, 0.5 / pos, 0.5 / max(1, len(y) - pos)) * 1000.0)
    t0 = time.perf_counter()
    gbm = HistGradientBoostingClassifier(max_depth=5, max_iter=300, learning_rate=0.05, random_state=0)
    gbm.fit(np.concatenate(xs), np.concatenate(ys), sample_weight=np.concatenate(ws))
    model = export(gbm)
    print(f"{len(model.trees)} trees fit in {time.perf_counter() - t0:.1f} s")

    def probs(key, min_cos=args.min_cos):
        x, _, hard = data[key]
        return np.where(hard | (x[:, 0] < min_cos), 0.0, gbm.predict_proba(x)[:, 1])
    tune = {n: probs((n, "tune")) for n in names}
    grid = np.linspace(0.5, 0.995, 100)
    ok = [t for t in grid if all(precision_recall(tune[n] >= t, data[(n, "tune")][1])[0] >= args.precision
                                 for n in names)]
    model.threshold = float(ok[0]) if ok else 0.995
    print(f"threshold {model.threshold:.3f} (precision >= {args.precision} on every set's tuning quarter)")
    x0 = data[(names[0], "test")][0][0]
    assert abs(model.raw(list(x0)) - gbm.decision_function(x0[None, :])[0]) < 1e-6  # the export is exact
    report = {}
    for n in names:
        _, y, _ = data[(n, "test")]
        prec, rec, hits = precision_recall(probs((n, "test"), args.report_cos) >= model.threshold, y)
        report[n] = {"precision": round(prec, 3), "recall": round(rec, 3), "hits": hits, "pairs": len(y)}
        print(f"  {n:8} test, pair mode at cosine {args.report_cos}: precision {prec:.3f} recall {rec:.3f} ({hits} hits of {len(y)} pairs)")
    model.info = {"trained_on": names, "tuning_precision": args.precision, "test_pair_mode": report,
                  "trees": len(model.trees), "max_depth": 5}
    if args.write:
        model.save()
        print(f"wrote {MODEL_PATH} ({os.path.getsize(MODEL_PATH) // 1024} KiB)")


if __name__ == "__main__":
    main()
