"""all-MiniLM-L6-v2 from its weights package (core/cache/minilm.py): the llama.cpp BERT GGUF it is
converted to and an independent numpy forward over the HF tokenizer give the same vectors."""
import numpy as np
import pytest

from tidegate.core.cache import minilm

SENTENCES = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today.",
             "How far is the moon from the earth?", "Où est la gare ? Naïve café résumé."]


@pytest.fixture(scope="module")
def weights():
    try:
        return minilm.weights_path()
    except minilm.MissingWeights as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def served(weights, tmp_path_factory):
    from tidegate.core.cache.embedders import make_embedder
    return make_embedder("minilm", data_dir=str(tmp_path_factory.mktemp("data")), quant="f32")


def test_llama_cpp_runs_the_same_network_as_the_reference(weights, served, monkeypatch):
    """To 1e-4 per component against numpy with llama.cpp's GELU (its tanh form); against the exact
    (erf) GELU sentence-transformers uses, the cosine is still 0.99999 or more."""
    ref = minilm.NumpyMiniLM(weights)
    exact = ref.embed(SENTENCES)
    got = served.embed(SENTENCES)
    assert got.shape == (len(SENTENCES), 384)
    assert np.all(np.sum(got * exact, axis=1) > 0.99999)
    monkeypatch.setattr(minilm, "_erf", lambda x: np.tanh(np.sqrt(2 / np.pi) * (x * np.sqrt(2.0) + 0.044715 * (
        x * np.sqrt(2.0)) ** 3)))  # 0.5 h (1 + erf(h / sqrt 2)) becomes ggml's tanh GELU
    assert float(np.abs(got - ref.embed(SENTENCES)).max()) < 1e-4


def test_the_quantized_encoder_stays_within_a_thousandth_of_the_reference(weights, served, tmp_path):
    """cache.embedder_quant = "q8_0" (the default): llama.cpp's 8-bit matrices."""
    from tidegate.core.cache.embedders import make_embedder
    q8 = make_embedder("minilm", data_dir=str(tmp_path), quant="q8_0")
    assert q8.engine.path.endswith("-q8_0.gguf")
    exact = minilm.NumpyMiniLM(weights).embed(SENTENCES)
    assert np.all(np.sum(q8.embed(SENTENCES) * exact, axis=1) > 0.999)


def test_the_tokenizers_agree(weights, served):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(minilm.read_zip(weights)[2])
    tok.no_padding()  # (its tokenizer.json pads to 128)
    for s in SENTENCES:
        assert served.engine.tokenize(s) == tok.encode(s).ids


def test_paraphrases_are_near_and_unrelated_sentences_far(served):
    v = served.embed(SENTENCES[:3])
    assert float(v[0] @ v[1]) > 0.75 and float(v[0] @ v[2]) < 0.2


def test_an_input_past_256_tokens_is_cut_like_sentence_transformers(served):
    long = " ".join(["parcel"] * 400)
    v = served.embed([long])
    assert v.shape == (1, 384) and abs(float(np.linalg.norm(v[0])) - 1) < 1e-4


def test_weights_that_are_not_the_known_ones_are_refused(weights, tmp_path, monkeypatch):
    monkeypatch.setattr(minilm, "MODEL_ZIP_SHA256", "0" * 64)
    with pytest.raises(minilm.MissingWeights, match="sha256"):
        minilm.weights_path()


def test_packed_inputs_give_the_vectors_of_one_by_one(served, weights, tmp_path):
    """A turn's texts go through llama.cpp packed (16 sequences, 512 tokens a pass): the same
    vectors as one input at a time (float32: to 5e-4; Q8_0, whose activations are quantized per
    pass: cosine 0.9995 or more)."""
    from tidegate.core.cache.embedders import make_embedder
    texts = SENTENCES * 4 + ["word " * 300]  # (the last one alone fills a pass: it is cut at 256 tokens)
    packed = served.embed(texts)
    alone = np.stack([served.embed([t])[0] for t in texts])
    assert float(np.abs(packed - alone).max()) < 5e-4
    q8 = make_embedder("minilm", data_dir=str(tmp_path), quant="q8_0")
    assert float(np.min(np.sum(q8.embed(texts) * np.stack([q8.embed([t])[0] for t in texts]), axis=1))) > 0.9995
