"""Models for POST /v1/predict: loaded from .npz (numpy) or ONNX (onnxruntime), scored in batches.

.npz layouts (numpy.savez):
  logistic regression   w (d,) or (d, k), b () or (k,)           -> sigmoid(X @ w + b)
  small MLP             W0, b0, W1, b1, … (ReLU between layers)  -> sigmoid (one output) or softmax
  optional              version (a string), the model's version in every answer
ONNX: the first input takes a float32 (n, d) batch; the first output is the answer.
A model's version is the one declared in config, else the `version` an .npz carries, else the
first 12 hex digits of its file's SHA-256, so two different files never answer under one version.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from tidegate.core.base.config import CLASSES

KINDS = ("npz", "onnx")


def kind_of(path: str) -> str:
    return "onnx" if path.lower().endswith(".onnx") else "npz"


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


class Model:
    """d inputs in, k outputs out per row; predict(X (n, d) float32) -> (n, k) float32."""

    def __init__(self, path: str, version: str = ""):
        self.path, self.kind = path, kind_of(path)
        self._sess = None
        if self.kind == "onnx":
            self._load_onnx(path)
        else:
            self._load_npz(path)
        self.version = version_of(path, version)

    def _load_npz(self, path: str) -> None:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if "w" in arrays:
            w = arrays["w"].astype(np.float32)
            self.layers = [(w.reshape(len(w), -1), np.asarray(arrays.get("b", 0.0), dtype=np.float32).reshape(-1))]
        else:
            i, self.layers = 0, []
            while f"W{i}" in arrays:
                self.layers.append((arrays[f"W{i}"].astype(np.float32), arrays[f"b{i}"].astype(np.float32).reshape(-1)))
                i += 1
            if not self.layers:
                raise ValueError(f"{path}: an .npz model needs w and b (logistic) or W0, b0, … (MLP)")
        for j, (W, b) in enumerate(self.layers):
            if W.ndim != 2 or b.shape[0] not in (1, W.shape[1]) or (j and W.shape[0] != self.layers[j - 1][0].shape[1]):
                raise ValueError(f"{path}: layer {j} has shapes {W.shape} and {b.shape} that do not chain")
        self.n_inputs, self.n_outputs = self.layers[0][0].shape[0], self.layers[-1][0].shape[1]

    def _load_onnx(self, path: str) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError(f"{path}: ONNX models need onnxruntime (pip install 'tidegate[onnx]')") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1  # one core per process: no thread pools fighting the loop
        self._sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        inp, out = self._sess.get_inputs()[0], self._sess.get_outputs()[0]
        self._in, self._out = inp.name, out.name
        d = inp.shape[-1] if inp.shape else None
        if not isinstance(d, int):
            raise ValueError(f"{path}: the ONNX input needs a fixed last dimension (the feature count)")
        self.n_inputs = d
        k = out.shape[-1] if len(out.shape or ()) > 1 else 1
        self.n_outputs = k if isinstance(k, int) else 1

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self._sess is not None:
            out = self._sess.run([self._out], {self._in: X})[0]
            return np.asarray(out, dtype=np.float32).reshape(len(X), -1)
        h = X
        last = len(self.layers) - 1
        for j, (W, b) in enumerate(self.layers):
            h = h @ W + b
            if j < last:
                np.maximum(h, 0, out=h)
        if h.shape[1] == 1:
            return _sigmoid(h)
        e = np.exp(h - h.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def check_inputs(model: Model, plan, name: str) -> None:
    if model.n_inputs != len(plan.names):
        raise ValueError(f"model {name!r}: {model.path} takes {model.n_inputs} inputs but its config lists "
                         f"{len(plan.names)} (predict.models inputs)")


def version_of(path: str, declared: str = "") -> str:
    """The declared version, else an .npz's own `version`, else the file's SHA-256 (12 hex digits);
    cheap (an .npz member is read alone), so an ingress worker names a model-worker model too."""
    if declared:
        return declared
    if kind_of(path) == "npz":
        with np.load(path, allow_pickle=False) as z:
            if "version" in z.files:
                return str(z["version"])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def model_problem(models, cfg=None) -> str | None:
    """The config rule for predict.models (declarations; inputs are checked against the views by Plan)."""
    names = set()
    for i, m in enumerate(models):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not 0 < len(m["name"]) <= 64 \
                or "/" in m["name"]:
            return f"item {i} must be a table with a name of 1 to 64 characters (no /)"
        if m["name"] in names:
            return f"item {i}: model {m['name']!r} is declared twice"
        names.add(m["name"])
        unknown = set(m) - {"name", "path", "inputs", "class", "worker", "version", "fallback",
                            "static"}
        if unknown:
            return f"item {i}: unknown field(s) {', '.join(sorted(unknown))}"
        if not isinstance(m.get("path"), str) or not m["path"]:
            return f"item {i}: path (an .npz or .onnx file) is required"
        if m.get("class", "standard") not in CLASSES:
            return f"item {i}: class must be critical, standard or background"
        if not isinstance(m.get("worker", False), bool):
            return f"item {i}: worker must be true or false"
        if m.get("fallback", "") not in ("", "last_served"):
            return f"item {i}: fallback must be \"last_served\" (the user's last answer) or \"\" (none)"
        static = m.get("static", {})
        if not isinstance(static, dict) or set(static) - {"score", "scores"} or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) if k == "score" else
                isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                for k, v in static.items()):
            return f"item {i}: static must be a table {{score = NUMBER}} or {{scores = [NUMBERS]}} (the answer " \
                   "served, marked fallback = static, when scoring is not possible and no last answer is)"
        if not isinstance(m.get("version", ""), str):
            return f"item {i}: version must be a string"
        if cfg is not None and not os.path.isfile(m["path"]):
            return f"item {i}: model file {m['path']!r} does not exist"
        if cfg is not None:
            from tidegate.core.predict.pipeline import plan_for  # the views it reads are declared elsewhere
            try:
                plan_for(m, cfg)
            except ValueError as e:
                return f"model {m['name']!r}: {e}"
    return None
