"""Train the semantic cache's learned hit decision (core/cache/hit_model.json, read by
core/cache/hitmodel.py) on the labelled paraphrase sets in ../shared (read there, never copied:
bench/paraphrase_sets.py), and report it per set on their held-out splits.

    python bench/train_hit_model.py [--embedder wordllama|minilm] [--precision 0.96] [--min-cos C] [--write]

Each set's "train" split is cut again: three quarters fit gradient-boosted trees (scikit-learn,
the bench extra; every set weighs the same, positives and negatives alike; pairs with a hard
conflict are left out, since those are vetoed before the trees are asked), the last quarter
picks the decision threshold: the lowest probability at which every set keeps the precision
asked for. The "test" splits, seen by neither, are reported per set in pair mode (each pair
decided alone, after the verifier's hard conflicts); bench/semantic_eval.py --lookup measures
lookup mode through the gateway. --write saves the model for the package, one file per embedder
(hit_model.json for WordLlama, hit_model-minilm.json...): each embedder's cosines have their own
scale, so each has its own trees, threshold and cosine floor (--min-cos, saved as "cos_floor":
the neighbours below it are never asked). Embeddings are kept in a cache file under the temp
directory (MiniLM embeds ~200 sentences/s here: a rerun costs seconds, not minutes).
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

import tempfile  # noqa: E402

from tidegate.core.cache.embedders import make_embedder  # noqa: E402
from tidegate.core.cache.hitmodel import HitModel, features, model_path  # noqa: E402
from tidegate.core.cache.verifier import conflicts  # noqa: E402

CAP = 20000  # pairs per set and split at most (the Twitter set has 42k)


class CachedEmbedder:
    """An embedder whose vectors are kept on disk by text hash between runs."""

    def __init__(self, emb, name: str):
        self.emb, self.path = emb, os.path.join(tempfile.gettempdir(), f"tidegate-train-{name}.npz")
        self.known: dict[bytes, np.ndarray] = {}
        if os.path.exists(self.path):
            z = np.load(self.path)
            self.known = dict(zip((bytes(k) for k in z["keys"]), z["vecs"]))
        self.added = False

    def embed(self, texts: list[str]) -> np.ndarray:
        keys = [hashlib.sha256(t.encode()).digest()[:16] for t in texts]
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in self.known}.items())
        for i in range(0, len(todo), 256):
            chunk = todo[i:i + 256]
            for (k, _), v in zip(chunk, self.emb.embed([t for _, t in chunk])):
                self.known[k] = v
            self.added = True
        return np.stack([self.known[k] for k in keys])

    def save(self) -> None:
        if self.added:
            keys = list(self.known)
            np.savez(self.path, keys=np.array([np.frombuffer(k, dtype=np.uint8) for k in keys]),
                     vecs=np.stack([self.known[k] for k in keys]))


def featurize(pairs, emb, traded: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, hard conflict) of each pair."""
    a = emb.embed([p[0] for p in pairs])
    b = emb.embed([p[1] for p in pairs])
    cos = (a * b).sum(1)
    x = np.array([features(p[0], p[1], float(c)) for p, c in zip(pairs, cos)])
    hard = np.array([bool(conflicts(p[0], p[1], traded)) for p in pairs])
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
    return HitModel(float(np.ravel(gbm._baseline_prediction)[0]), trees, 0.5, n_features=gbm.n_features_in_)


def main() -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", type=float, default=0.96, help="precision every set's tuning quarter must keep")
    ap.add_argument("--embedder", choices=["wordllama", "minilm"], default="wordllama")
    ap.add_argument("--conflicts", choices=["strict", "traded"], default="traded",
                    help="the hard vetoes before the trees (core/cache/verifier.conflicts): numbers and entities "
                         "that differ at all (strict) or only where each text has one the other lacks (traded)")
    ap.add_argument("--write", action="store_true", help="save the model to the package (core/cache/)")
    ap.add_argument("--min-cos", type=float, default=0.0,
                    help="fit and tune on pairs at this cosine or more only (the trees only ever see neighbours "
                         "above the cache's threshold)")
    ap.add_argument("--report-cos", type=float, default=None,
                    help="the cosine threshold the test report applies (default: --min-cos)")
    args = ap.parse_args()
    traded = args.conflicts == "traded"
    if args.report_cos is None:
        args.report_cos = args.min_cos
    emb = CachedEmbedder(make_embedder(args.embedder, data_dir=os.path.join(tempfile.gettempdir(), "tidegate-train")),
                         args.embedder)
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
                data[(name, "fit")] = featurize([p for p, t in zip(pairs, tune) if not t], emb, traded)
                data[(name, "tune")] = featurize([p for p, t in zip(pairs, tune) if t], emb, traded)
            else:
                data[(name, "test")] = featurize(pairs, emb, traded)
    emb.save()
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
    ok = [all(precision_recall(tune[n] >= t, data[(n, "tune")][1])[0] >= args.precision for n in names) for t in grid]
    if os.environ.get("TRAIN_DEBUG"):
        for t in grid[::5]:
            print(f"  t {t:.3f} " + " ".join(f"{n} %.3f/%d" % precision_recall(tune[n] >= t, data[(n, 'tune')][1])[::2]
                                            for n in names))
    # the lowest threshold from which every higher one keeps the precision too (not a lucky dip)
    model.threshold = next((float(t) for i, t in enumerate(grid) if all(ok[i:])), 0.995)
    print(f"threshold {model.threshold:.3f} (precision >= {args.precision} on every set's tuning quarter)")
    x0 = data[(names[0], "test")][0][0]
    assert abs(model.raw(list(x0)) - gbm.decision_function(x0[None, :])[0]) < 1e-6  # the export is exact
    report = {}
    for n in names:
        _, y, _ = data[(n, "test")]
        prec, rec, hits = precision_recall(probs((n, "test"), args.report_cos) >= model.threshold, y)
        report[n] = {"precision": round(prec, 3), "recall": round(rec, 3), "hits": hits, "pairs": len(y)}
        print(f"  {n:8} test, pair mode at cosine {args.report_cos}: precision {prec:.3f} recall {rec:.3f} ({hits} hits of {len(y)} pairs)")
    model.cos_floor, model.traded = args.min_cos, traded
    model.info = {"embedder": args.embedder, "trained_on": names, "tuning_precision": args.precision,
                  "test_pair_mode": report, "trees": len(model.trees), "max_depth": 5}
    if args.write:
        path = model_path(args.embedder)
        model.save(path)
        print(f"wrote {path} ({os.path.getsize(path) // 1024} KiB)")


if __name__ == "__main__":
    main()
