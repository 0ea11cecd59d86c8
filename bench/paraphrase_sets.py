"""The labelled paraphrase sets in ../shared/data/paraphrase, read where they are (their terms
forbid copying them into the repository), each as [(text_a, text_b, label)] with label 1 when a
cached answer for one may be served for the other, and a fixed split: a pair's hash decides
whether it is for tuning ("train") or for the held-out test ("test").

    paws     PAWS-Wiki dev: 8,000 word-swap pairs (the adversarial case)
    mrpc     MRPC train: 4,076 news sentence pairs
    twitter  Twitter URL corpus train: 42,200 informal rephrasings
    sick     SICK train + trial: positives entail with relatedness >= 4, negatives contradict;
             neutral pairs and weak entailments are left out
"""
from __future__ import annotations

import hashlib
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "paraphrase")
SETS = ("paws", "mrpc", "twitter", "sick")


def _paws():
    for line in open(os.path.join(ROOT, "paws_wiki_dev.tsv"), encoding="utf-8"):
        p = line.rstrip("\n").split("\t")
        if len(p) == 4 and p[3] in ("0", "1"):
            yield p[1], p[2], int(p[3])


def _mrpc():
    for line in open(os.path.join(ROOT, "mrpc_train.tsv"), encoding="utf-8-sig"):
        p = line.rstrip("\n").split("\t")
        if len(p) == 5 and p[0] in ("0", "1"):
            yield p[3], p[4], int(p[0])


def _twitter():
    d = os.path.join(ROOT, "twitter_url_train")
    with open(os.path.join(d, "a.toks"), encoding="utf-8") as a, open(os.path.join(d, "b.toks"), encoding="utf-8") as b, \
            open(os.path.join(d, "sim.txt")) as s:
        for x, y, lab in zip(a, b, s):
            yield x.strip(), y.strip(), int(lab.strip())


def _sick():
    for name in ("sick_train.txt", "sick_trial.txt"):
        for i, line in enumerate(open(os.path.join(ROOT, name), encoding="utf-8")):
            p = line.rstrip("\n").split("\t")
            if i == 0 or len(p) < 5:
                continue
            if p[4] == "CONTRADICTION":
                yield p[1], p[2], 0
            elif p[4] == "ENTAILMENT" and float(p[3]) >= 4.0:
                yield p[1], p[2], 1  # (neutral pairs, and weak entailments, say nothing about a cache hit)


READERS = {"paws": _paws, "mrpc": _mrpc, "twitter": _twitter, "sick": _sick}
FILES = {"paws": "paws_wiki_dev.tsv", "mrpc": "mrpc_train.tsv", "twitter": "twitter_url_train", "sick": "sick_train.txt"}


def available(name: str) -> bool:
    return os.path.exists(os.path.join(ROOT, FILES[name]))


def split_of(a: str, b: str) -> str:
    return "test" if hashlib.sha256((a + "\t" + b).encode()).digest()[0] < 77 else "train"  # ~30% held out


def load(name: str, split: str | None = None) -> list[tuple[str, str, int]]:
    """The set's pairs (all, or one split); FileNotFoundError naming the file when it is missing."""
    if not available(name):
        raise FileNotFoundError(f"{name}: {os.path.join(ROOT, FILES[name])} is missing")
    return [p for p in READERS[name]() if split is None or split_of(p[0], p[1]) == split]
