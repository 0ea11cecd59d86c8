"""The learned hit decision shipped in the package (core/cache/hit_model.json): it loads, keeps the
verifier's hard conflicts as vetoes, refuses swapped roles and changed objects, and serves plain
rephrasings that the verifier's alignment rules would also accept."""
import pytest

from tidegate.core.cache.embedders import WordLlamaEmbedder
from tidegate.core.cache.hitmodel import NAMES, decide, features, model

SAME = [("How do I reset my password?", "How can I reset my password?"),
        ("What is the capital of France?", "What's the capital of France?"),
        ("Where is my parcel?", "Where's my parcel?")]
DIFFERENT = [("Book a flight from New York to Florida.", "Book a flight from Florida to New York.", "model"),
             ("The dog bit the man.", "The man bit the dog.", "model"),
             ("Transfer 500 dollars to savings.", "Transfer 50 dollars to savings.", "numbers"),
             ("Is the museum open on Monday?", "Is the museum not open on Monday?", "negation"),
             ("What is the maximum dose for adults?", "What is the maximum dose for children?", "antonym"),
             ("Is it safe to take ibuprofen daily?", "Is it dangerous to take ibuprofen daily?", "antonym"),
             ("How do I delete the file from the terminal?", "How do I create the file from the terminal?",
              "antonym"),
             ("Is it safe to mix bleach and ammonia?", "Is it safe to mix bleach and water?", "substitution")]


@pytest.fixture(scope="module")
def emb():
    return WordLlamaEmbedder()


def _cos(emb, a, b):
    va, vb = emb.embed([a, b])
    return float(va @ vb)


def test_the_shipped_model_loads_and_reads_its_features():
    m = model()
    assert 0.5 <= m.threshold < 1 and len(m.trees) > 10
    assert len(features("a b c", "a b d", 0.9)) == len(NAMES)
    assert m.info["trained_on"] and all(r["precision"] >= 0.9 for r in m.info["test_pair_mode"].values())


@pytest.mark.parametrize("a,b", SAME)
def test_rephrasings_are_served(emb, a, b):
    assert decide(a, b, _cos(emb, a, b)) == (True, "")


@pytest.mark.parametrize("a,b,why", DIFFERENT)
def test_changed_meanings_are_refused_with_a_reason(emb, a, b, why):
    assert decide(a, b, _cos(emb, a, b)) == (False, why)
