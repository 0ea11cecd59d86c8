"""Tabular predictions: models (numpy .npz, ONNX), micro-batching, the hydrate-then-score pipeline."""
