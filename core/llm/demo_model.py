"""A tiny random-weight llama GGUF with a real tokenizer, built offline.

Tests, benchmarks and `tidegate serve` without a configured model use it. The weights are
seeded noise (the text it writes is gibberish, but deterministic: greedy decoding of the same
prompt gives the same tokens every time), the tokenizer is Llama-2's 32k SentencePiece-style BPE
taken from the WordLlama wheel, so English tokenizes as with a real Llama-2 model. Nothing is
fetched from the network.

    tidegate model make-demo PATH [--size tiny|bench]
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from tidegate.core.llm.chat_template import FALLBACK

# name -> (n_embd, n_layer, n_head, n_ff, dtype). "bench" is ~167M parameters: timings closer to a
# real model, for benchmarks only (312 MB, generated on the fly, never committed).
SIZES = {
    "tiny": (128, 2, 4, 256, np.float32),
    "bench": (768, 12, 12, 3072, np.float16),
}
N_CTX_TRAIN = 4096
DEMO_NAME = "tidegate-demo"
# Zephyr-like turns; the demo vocabulary has no chat tokens, so the markers are plain text.
CHAT_TEMPLATE = FALLBACK  # written into the GGUF, so the demo model carries its own template


def tokenizer_json_path() -> str:
    """Llama-2's tokenizer.json as shipped inside the installed WordLlama wheel."""
    import wordllama
    path = os.path.join(os.path.dirname(wordllama.__file__), "tokenizers", "l2_supercat_tokenizer_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"the Llama-2 tokenizer is not where wordllama puts it: {path}")
    return path


def llama_vocab(path: str) -> tuple[list[bytes], list[float], list[int]]:
    """(tokens, scores, types) for llama.cpp's SPM tokenizer from a HF BPE tokenizer.json with
    byte fallback. Llama-2's ids follow merge order, so score = -id merges like the original."""
    import gguf
    with open(path, encoding="utf-8") as f:
        model = json.load(f)["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens, scores, types = [], [], []
    for text, i in by_id:
        tokens.append(text.encode("utf-8"))
        if text == "<unk>":
            types.append(gguf.TokenType.UNKNOWN)
            scores.append(0.0)
        elif text in ("<s>", "</s>"):
            types.append(gguf.TokenType.CONTROL)
            scores.append(0.0)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            types.append(gguf.TokenType.BYTE)
            scores.append(0.0)
        else:
            types.append(gguf.TokenType.NORMAL)
            scores.append(-float(i))
    return tokens, scores, types


def make_demo(path: str, size: str = "tiny", seed: int = 1234) -> str:
    """Write the demo model to path (atomically) and return path."""
    import logging

    import gguf
    logging.getLogger("gguf").setLevel(logging.WARNING)
    n_embd, n_layer, n_head, n_ff, dtype = SIZES[size]
    tokens, scores, types = llama_vocab(tokenizer_json_path())
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def w(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)

    tmp = f"{path}.tmp{os.getpid()}"
    out = gguf.GGUFWriter(tmp, "llama")
    out.add_name(f"{DEMO_NAME}-{size}")
    out.add_context_length(N_CTX_TRAIN)
    out.add_embedding_length(n_embd)
    out.add_block_count(n_layer)
    out.add_feed_forward_length(n_ff)
    out.add_head_count(n_head)
    out.add_head_count_kv(n_head)
    out.add_rope_dimension_count(n_embd // n_head)
    out.add_layer_norm_rms_eps(1e-5)
    out.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    out.add_tokenizer_model("llama")
    out.add_token_list(tokens)
    out.add_token_scores(scores)
    out.add_token_types(types)
    out.add_bos_token_id(1)
    out.add_eos_token_id(2)
    out.add_unk_token_id(0)
    out.add_add_bos_token(True)
    out.add_add_eos_token(False)
    out.add_chat_template(CHAT_TEMPLATE)
    out.add_tensor("token_embd.weight", w(n_vocab, n_embd))
    out.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    out.add_tensor("output.weight", w(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        out.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            out.add_tensor(p + name + ".weight", w(n_embd, n_embd))
        out.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        out.add_tensor(p + "ffn_gate.weight", w(n_ff, n_embd))
        out.add_tensor(p + "ffn_up.weight", w(n_ff, n_embd))
        out.add_tensor(p + "ffn_down.weight", w(n_embd, n_ff))
    return save_gguf(out, tmp, path)


def save_gguf(writer, tmp: str, path: str) -> str:
    """Write a filled GGUFWriter (opened on tmp) and move it to path whole (a reader never sees half)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def is_demo(path: str) -> bool:
    """Whether the GGUF at path is a random-weight demo model (its general.name, read from the
    header's first bytes: the name is the second key written)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    i = head.find(b"general.name")
    return i >= 0 and DEMO_NAME.encode() in head[i: i + 64]


def ensure_demo(data_dir: str, size: str = "tiny") -> str:
    """The demo model under data_dir, built on first use."""
    path = os.path.join(data_dir, f"{DEMO_NAME}-{size}.gguf")
    if not os.path.exists(path):
        os.makedirs(data_dir, exist_ok=True)
        make_demo(path, size)
    return path
