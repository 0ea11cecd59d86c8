"""A learned hit decision for the semantic cache (issue 15, in progress; not used by the daemon
yet): a logistic model over several signals of a (query, cached text) pair, trained on the
labelled paraphrase sets by bench/train_hit_model.py. First figures (that script's
run): one model for every set loses to one model per set by far, because the sets disagree
about what a positive is; it moves to core/cache when a decision beats the verifier in lookup
mode.

A cosine threshold alone cannot tell "flights from New York to Florida" from the reverse, and the
verifier's rules alone refuse most real rephrasings (they move words). The model weighs, for the
nearest entries: the embedding cosine, how much of each text the word alignment covers, the
unaligned content words, moved words and gaps, character trigram overlap, length ratio, and the
verifier's conflict signals (numbers, negation, entities, opposite words). The verifier's hard
conflicts still veto before the model is asked (core/cache/verifier.py).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from tidegate.core.cache.verifier import FUNCTION_WORDS, _align, _gaps, _normal, _tokens, conflicts

MODEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "hit_model.json")
NAMES = ("bias", "cos", "cos2", "cover_long", "cover_short", "jaccard", "len_ratio", "gaps", "moved",
         "content_left", "content_left_share", "trigram", "conflict", "exact", "cos_x_cover")


def _trigrams(text: str) -> set[str]:
    t = " " + " ".join(_tokens(text)) + " "
    return {t[i:i + 3] for i in range(len(t) - 2)}


HINGES = {"cos": (0.75, 0.85, 0.9, 0.95), "cover_long": (0.6, 0.8, 0.9), "trigram": (0.4, 0.6, 0.8),
          "jaccard": (0.5, 0.7, 0.9)}  # piecewise-linear terms: max(0, feature - knot)
EXPANDED = NAMES + tuple(f"{n}>{k}" for n, ks in HINGES.items() for k in ks)


def expand(x: np.ndarray) -> np.ndarray:
    """Rows of features() with the hinge terms appended (the model is linear in these)."""
    cols = [x]
    for n, ks in HINGES.items():
        f = x[:, NAMES.index(n)][:, None]
        cols.append(np.maximum(0.0, f - np.array(ks)[None, :]))
    return np.concatenate(cols, axis=1)


def features(query: str, candidate: str, cos: float, max_tokens: int = 256) -> np.ndarray:
    q, c = _normal(query), _normal(candidate)
    tq, tc = _tokens(q), _tokens(c)
    n_long, n_short = max(len(tq), len(tc), 1), max(min(len(tq), len(tc)), 1)
    if max(len(tq), len(tc)) <= max_tokens:
        common, used_q, used_c = _align(tq, tc)
    else:  # (alignment is quadratic: long texts compare as bags)
        common, used_q, used_c = len(set(tq) & set(tc)), [t in set(tc) for t in tq], [t in set(tq) for t in tc]
    left_q = [t for t, u in zip(tq, used_q) if not u]
    left_c = [t for t, u in zip(tc, used_c) if not u]
    moved = len(set(left_q) & set(left_c))
    content = [t for t in left_q + left_c if t not in FUNCTION_WORDS]
    sq, sc = set(tq), set(tc)
    tg_q, tg_c = _trigrams(q), _trigrams(c)
    cover = common / n_long
    return np.array([
        1.0, cos, cos * cos, cover, common / n_short,
        len(sq & sc) / max(len(sq | sc), 1), n_short / n_long,
        min(_gaps(used_q) + _gaps(used_c), 6) / 6.0, min(moved, 4) / 4.0,
        min(len(content), 8) / 8.0, len(content) / (len(tq) + len(tc) or 1),
        len(tg_q & tg_c) / max(len(tg_q | tg_c), 1),
        1.0 if conflicts(query, candidate) else 0.0,
        1.0 if tq == tc else 0.0, cos * cover], dtype=np.float64)


class HitModel:
    """p(same meaning) = sigmoid(w . features); a hit needs p >= threshold."""

    def __init__(self, weights, threshold: float, mean=None, scale=None, info=None):
        self.w = np.asarray(weights, dtype=np.float64)
        self.mean = np.zeros_like(self.w) if mean is None else np.asarray(mean, dtype=np.float64)
        self.scale = np.ones_like(self.w) if scale is None else np.asarray(scale, dtype=np.float64)
        self.threshold, self.info = float(threshold), info or {}

    @classmethod
    def load(cls, path: str = MODEL_PATH) -> "HitModel":
        with open(path) as f:
            d = json.load(f)
        if d.get("features") != list(EXPANDED):
            raise ValueError(f"{path} was trained on other features: retrain (bench/train_hit_model.py)")
        return cls(d["weights"], d["threshold"], d.get("mean"), d.get("scale"), d.get("info"))

    def save(self, path: str = MODEL_PATH) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"features": list(EXPANDED), "weights": self.w.round(6).tolist(), "mean": self.mean.round(6).tolist(),
                       "scale": self.scale.round(6).tolist(), "threshold": round(self.threshold, 6),
                       "info": self.info}, f, indent=1)

    def prob_of(self, x: np.ndarray) -> np.ndarray:
        """p for rows of features()."""
        z = ((expand(x) - self.mean) / self.scale) @ self.w
        return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))

    def prob(self, query: str, candidate: str, cos: float) -> float:
        return float(self.prob_of(features(query, candidate, cos)[None, :])[0])


def fit_logistic(x: np.ndarray, y: np.ndarray, weight: np.ndarray, l2: float = 1e-3, steps: int = 400) -> HitModel:
    """Weighted L2 logistic regression by Newton's method on expand(x) (a few dozen terms: exact
    and quick)."""
    x = expand(x)
    mean, scale = x.mean(0), x.std(0)
    mean[0], scale[0] = 0.0, 1.0  # the bias column stays 1
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -40, 40)))
        g = z.T @ (weight * (p - y)) + l2 * w
        h = (z * (weight * p * (1 - p))[:, None]).T @ z + l2 * np.eye(len(w))
        step = np.linalg.solve(h, g)
        w -= step
        if math.sqrt(float(step @ step)) < 1e-8:
            break
    return HitModel(w, 0.5, mean, scale)
