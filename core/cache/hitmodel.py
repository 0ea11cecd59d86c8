"""The semantic cache's learned hit decision (`cache.semantic_decision = "model"`): gradient-
boosted trees over several signals of a (query, cached text) pair, trained on labelled paraphrase
sets by bench/train_hit_model.py, which writes hit_model.json here (shipped with the package).

A cosine threshold alone cannot tell "flights from New York to Florida" from the reverse, and the
verifier's alignment rules alone refuse most real rephrasings (they move words). The trees weigh,
for each neighbour above the cosine threshold: the embedding cosine, how much of each text the
word alignment covers, the unaligned content words, moved words and gaps, character trigram
overlap and length ratio. The hard conflicts (numbers, negation, entities, opposites, a content
word traded for another: core/cache/verifier.conflicts) veto before the trees are asked, so the
trees are trained on pairs without them.
Evaluated here in plain Python (a few hundred shallow trees: well under a millisecond).
"""
from __future__ import annotations

import functools
import json
import math
import os

from tidegate.core.cache.verifier import FUNCTION_WORDS, _align, _gaps, _normal, _tokens, conflicts, differences

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_PATH = os.path.join(HERE, "hit_model.json")  # WordLlama's (the first one trained)


def model_path(embedder: str) -> str:
    """Each embedder's cosines have their own scale: its own trees, threshold and cosine floor."""
    return MODEL_PATH if embedder == "wordllama" else os.path.join(HERE, f"hit_model-{embedder}.json")
NAMES = ("cos", "cover_long", "cover_short", "jaccard", "len_ratio", "gaps", "moved", "content_left",
         "content_left_share", "trigram", "exact", "numbers_differ", "entities_differ", "length")
# (a model trained before a feature was appended reads a prefix of NAMES: its trees never ask for the rest)


def _trigrams(text: str) -> set[str]:
    t = " " + " ".join(_tokens(text)) + " "
    return {t[i:i + 3] for i in range(len(t) - 2)}


def features(query: str, candidate: str, cos: float, max_tokens: int = 256) -> list[float]:
    """The signals the trees read, in NAMES order."""
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
    return [
        cos, common / n_long, common / n_short,
        len(sq & sc) / max(len(sq | sc), 1), n_short / n_long,
        min(_gaps(used_q) + _gaps(used_c), 6) / 6.0, min(moved, 4) / 4.0,
        min(len(content), 8) / 8.0, len(content) / (len(tq) + len(tc) or 1),
        len(tg_q & tg_c) / max(len(tg_q | tg_c), 1),
        1.0 if tq == tc else 0.0, *differences(query, candidate), min(len(tq) + len(tc), 120) / 120.0]


class HitModel:
    """p(same meaning) = sigmoid(baseline + the trees' leaf values); a hit needs p >= threshold.
    A tree is (feature, threshold, left, right, is_leaf, value) arrays, sklearn's layout."""

    def __init__(self, baseline: float, trees: list[dict], threshold: float, info=None, cos_floor: float = 0.0,
                 n_features: int = len(NAMES), traded: bool = False):
        """cos_floor: the cosine the trees were trained and tuned from (neighbours below it are
        never asked: the cache's default threshold for this embedder)."""
        self.baseline, self.threshold, self.info = float(baseline), float(threshold), info or {}
        self.cos_floor, self.n_features, self.traded = float(cos_floor), n_features, traded
        self.trees = [(t["feature"], t["threshold"], t["left"], t["right"], t["leaf"], t["value"]) for t in trees]

    @classmethod
    def load(cls, path: str = MODEL_PATH) -> "HitModel":
        with open(path) as f:
            d = json.load(f)
        names = d.get("features") or []
        if not names or names != list(NAMES[: len(names)]):
            raise ValueError(f"{path} was trained on other features: retrain (bench/train_hit_model.py)")
        return cls(d["baseline"], d["trees"], d["threshold"], d.get("info"), d.get("cos_floor", 0.0), len(names),
                   d.get("conflicts") == "traded")

    def save(self, path: str = MODEL_PATH) -> None:
        trees = [{"feature": f, "threshold": [round(x, 6) for x in t], "left": lf, "right": r, "leaf": lv,
                  "value": [round(x, 6) for x in v]} for f, t, lf, r, lv, v in self.trees]
        with open(path, "w") as fh:
            json.dump({"features": list(NAMES[: self.n_features]), "conflicts": "traded" if self.traded else "strict",
                       "baseline": round(self.baseline, 6), "threshold": round(self.threshold, 4),
                       "cos_floor": round(self.cos_floor, 4), "trees": trees, "info": self.info}, fh, separators=(",", ":"))

    def raw(self, x) -> float:
        z = self.baseline
        for feat, thr, left, right, leaf, value in self.trees:
            i = 0
            while not leaf[i]:
                i = left[i] if x[feat[i]] <= thr[i] else right[i]
            z += value[i]
        return z

    def prob(self, query: str, candidate: str, cos: float) -> float:
        return 1.0 / (1.0 + math.exp(-max(-40.0, min(40.0, self.raw(features(query, candidate, cos))))))


@functools.cache
def model(embedder: str = "wordllama") -> HitModel:
    """The shipped model for an embedder, loaded once per process (an embedder without one of its
    own, a custom GGUF, is refused: its cosines are on no scale the trees know)."""
    path = model_path(embedder)
    if not os.path.exists(path):
        raise ValueError(f"no hit model trained for embedder {embedder!r} ({path}): use "
                         f"cache.semantic_decision = \"verifier\" or train one (bench/train_hit_model.py)")
    return HitModel.load(path)


def decide(query: str, candidate: str, cos: float, embedder: str = "wordllama",
           strictness: float = 0.0) -> tuple[bool, str]:
    """(True, "") when the trees may serve candidate for query, else (False, the reason).
    strictness raises the probability needed (the error budget's tightening)."""
    m = model(embedder)
    reason = conflicts(query, candidate, m.traded)
    if reason:
        return False, reason
    if m.prob(query, candidate, cos) < min(0.999, m.threshold + strictness):
        return False, "model"
    return True, ""
