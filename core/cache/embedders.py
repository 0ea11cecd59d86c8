"""Text embedders for the semantic cache: `embed(texts) -> float32 array (n, dim)`, rows of unit
length, so a dot product is the cosine.

WordLlama (default): 256-d, ships its weights in the wheel, ~0.1 ms a sentence on a CPU. Its
`load()` with defaults looks for the tokenizer in the wrong folder and then tries the network,
so it is loaded from the installed package folder with downloads disabled. "minilm" is
sentence-transformers' all-MiniLM-L6-v2 (384-d, a real sentence encoder) from its weights
package, converted once to a llama.cpp BERT GGUF (core/cache/minilm.py); "gguf" is any GGUF
embedding model through llama.cpp (mean pooling).
"""
from __future__ import annotations

import os

import numpy as np


class WordLlamaEmbedder:
    name = "wordllama"

    def __init__(self, dim: int = 256):
        import wordllama
        self.model = wordllama.WordLlama.load(cache_dir=os.path.dirname(wordllama.__file__), disable_download=True,
                                              dim=dim)
        self.dim = dim

    def embed(self, texts: list[str]) -> np.ndarray:
        v = np.asarray(self.model.embed(texts), dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


class GGUFEmbedder:
    name = "gguf"

    def __init__(self, path: str, n_ctx: int = 512, threads: int = 1):
        from tidegate.core.llm.engine import Engine
        self.engine = Engine(path, n_ctx=n_ctx, n_seq=1, embeddings=True, threads=threads, embed_seqs=16)
        self.dim = self.engine.n_embd

    def embed(self, texts: list[str]) -> np.ndarray:
        e = self.engine
        if e.embed_seqs > 1:  # an encoder: a turn's texts (from every ingress worker) in few passes
            return e.embed_many([e.tokenize(t)[: e.n_ctx] for t in texts])
        return np.array([e.embed(e.tokenize(t)) for t in texts], dtype=np.float32)


class MiniLMEmbedder(GGUFEmbedder):
    name = "minilm"

    def __init__(self, data_dir: str, threads: int = 1, quant: str = "q8_0"):
        from tidegate.core.cache import minilm
        super().__init__(minilm.gguf_path(minilm.weights_path(), data_dir, quant), n_ctx=minilm.MAX_TOKENS,
                         threads=threads)

    def embed(self, texts: list[str]) -> np.ndarray:
        inputs, n = [], self.engine.n_ctx
        for t in texts:
            toks = self.engine.tokenize(t)
            if len(toks) > n:  # cut as sentence-transformers cuts (at 256 tokens), still ending with [SEP]
                toks = toks[: n - 1] + toks[-1:]
            inputs.append(toks)
        return self.engine.embed_many(inputs)


def make_embedder(kind: str, path: str = "", data_dir: str = "", threads: int = 1, quant: str = "q8_0"):
    """threads: llama.cpp's for the GGUF embedders. One by default: a query is a few dozen tokens
    (MiniLM: ~5 ms on one core), and a second thread spin-waiting at each layer's barrier beside
    the ingress workers cost 5x under load here (50 ms, not 11). quant: MiniLM's weights as
    converted ("f32") or quantized to 8 bits ("q8_0": 1.2-1.5x one at a time, bench/embedder_speed.py)."""
    if kind == "wordllama":
        return WordLlamaEmbedder()
    if kind == "gguf":
        return GGUFEmbedder(path, threads=threads)
    if kind == "minilm":
        return MiniLMEmbedder(data_dir, threads, quant)
    raise ValueError(f"unknown embedder {kind!r} (wordllama, minilm, gguf)")
