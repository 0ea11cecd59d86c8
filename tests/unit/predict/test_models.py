"""Model files: .npz logistic regression and MLP against numpy written out by hand, the same
logistic model as ONNX (built with onnx.helper) scoring the same, versions."""
import numpy as np
import pytest

from tidegate.core.predict.models import Model, model_problem, version_of


def test_npz_logistic_and_mlp(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(5, 4)).astype(np.float32)
    w, b = rng.normal(size=4).astype(np.float32), np.float32(0.3)
    np.savez(tmp_path / "lr.npz", w=w, b=b, version="v7")
    m = Model(str(tmp_path / "lr.npz"))
    assert (m.n_inputs, m.n_outputs, m.version) == (4, 1, "v7")
    np.testing.assert_allclose(m.predict(X)[:, 0], 1 / (1 + np.exp(-(X @ w + b))), rtol=1e-5)
    W0, W1 = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(6, 3)).astype(np.float32)
    np.savez(tmp_path / "mlp.npz", W0=W0, b0=np.zeros(6, np.float32), W1=W1, b1=np.ones(3, np.float32))
    m = Model(str(tmp_path / "mlp.npz"))
    logits = np.maximum(X @ W0, 0) @ W1 + 1
    want = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(m.predict(X), want, rtol=1e-5)
    assert m.n_outputs == 3 and len(m.version) == 12  # no version inside: the file's hash
    np.savez(tmp_path / "bad.npz", W0=W0, b0=np.zeros(6, np.float32), W1=W0, b1=np.zeros(6, np.float32))
    with pytest.raises(ValueError, match="do not chain"):
        Model(str(tmp_path / "bad.npz"))


def test_onnx_logistic_matches_npz(tmp_path):
    onnx = pytest.importorskip("onnx")  # a test extra
    from onnx import TensorProto, helper
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(4, 1)).astype(np.float32), np.array([0.1], np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z0"]), helper.make_node("Add", ["z0", "b"], ["z"]),
         helper.make_node("Sigmoid", ["z"], ["y"])], "lr",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 1], w.ravel()), helper.make_tensor("b", TensorProto.FLOAT, [1], b)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "lr.onnx")
    np.savez(tmp_path / "lr.npz", w=w.ravel(), b=b[0])
    X = rng.normal(size=(7, 4)).astype(np.float32)
    m = Model(str(tmp_path / "lr.onnx"), version="declared")
    assert (m.n_inputs, m.n_outputs, m.version) == (4, 1, "declared")
    np.testing.assert_allclose(m.predict(X), Model(str(tmp_path / "lr.npz")).predict(X), rtol=1e-5)
    assert version_of(str(tmp_path / "lr.onnx")) != version_of(str(tmp_path / "lr.npz"))


def test_model_declarations_are_checked():
    assert "path" in model_problem([{"name": "m"}])
    assert "twice" in model_problem([{"name": "m", "path": "a"}, {"name": "m", "path": "b"}])
    assert "class" in model_problem([{"name": "m", "path": "a", "class": "urgent"}])
    assert "unknown field" in model_problem([{"name": "m", "path": "a", "threads": 2}])
    assert "fallback" in model_problem([{"name": "m", "path": "a", "fallback": "zero"}])
    assert model_problem([{"name": "m", "path": "a", "inputs": ["request.x"]}]) is None
