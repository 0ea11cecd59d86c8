"""A long embeddings input is computed n_batch tokens at a time (issue 26, 2): the pooled vector
must be the one a single batch gives, and no turn may hold more than n_batch of it."""
from __future__ import annotations

import numpy as np

from tidegate.core.llm.engine import Engine


def test_an_input_split_into_chunks_embeds_as_one_batch(demo_model):
    whole = Engine(demo_model, n_ctx=512, n_seq=1, n_batch=512, embeddings=True)
    parts = Engine(demo_model, n_ctx=512, n_seq=1, n_batch=32, embeddings=True)
    assert whole.embed_chunk == 512 and parts.embed_chunk == 32  # the demo model is causal
    toks = whole.tokenize(" ".join(["customs parcel window refund"] * 40))
    assert 100 < len(toks) < 512
    a, b = np.array(whole.embed(toks)), np.array(parts.embed(toks))
    assert abs(np.linalg.norm(a) - 1) < 1e-4
    assert float(a @ b) > 0.9999  # the same vector, up to float rounding
    other = np.array(whole.embed(whole.tokenize("a different sentence entirely")))
    assert float(a @ other) < 0.9999  # (the comparison can tell vectors apart)
