"""The semantic cache's embedders side by side, in one process on one thread: texts per second
one at a time (a lookup) and packed 16 a pass (a turn of the embedder), with ratios against
MiniLM float32 one at a time.

    python bench/embedder_speed.py [--texts 200] [--rounds 3]

Texts: held-out PAWS sentences (long, ~35 tokens) and SICK sentences (short, ~12 tokens) from
../shared, read there. The median of the rounds is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import paraphrase_sets as P  # noqa: E402

from tidegate.core.cache.embedders import make_embedder  # noqa: E402


def rate(emb, texts: list[str], batch: int, rounds: int) -> float:
    emb.embed(texts[:batch])  # (warm)
    runs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            emb.embed(texts[i:i + batch])
        runs.append(len(texts) / (time.perf_counter() - t0))
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    data = tempfile.mkdtemp(prefix="embedder-speed-")
    embedders = {"minilm f32": make_embedder("minilm", data_dir=data, quant="f32"),
                 "minilm q8_0": make_embedder("minilm", data_dir=data, quant="q8_0"),
                 "wordllama": make_embedder("wordllama")}
    for name in ("paws", "sick"):
        pairs = [p for p in P.load(name) if P.split_of(p[0], p[1]) == "test"]
        texts = [a for a, _, _ in pairs[:: max(1, len(pairs) // args.texts)]][: args.texts]
        base = None
        print(f"{name} ({len(texts)} texts):")
        for label, emb in embedders.items():
            for batch in (1, 16):
                r = rate(emb, texts, batch, args.rounds)
                base = base or r
                print(f"  {label:12} batch {batch:2}  {r:9.0f} texts/s  {r / base:6.2f}x minilm f32 one at a time")


if __name__ == "__main__":
    main()
