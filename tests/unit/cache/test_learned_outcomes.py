"""What the semantic cache learns from verified outcomes: an entry tightened by a wrong answer
refuses that close from then on, a verified rephrasing promotes the entry for queries as close,
a near-miss's answer is verified off the lookup path (bounded per turn), and a namespace's error
budget keeps the measured wrong-hit rate under the budget on a stream with a known one."""
import random

import pytest

from tidegate.core.cache.embedders import WordLlamaEmbedder
from tidegate.core.cache.learning import Bounds, ErrorBudget
from tidegate.core.cache.semantic_store import SemanticStore


@pytest.fixture(scope="module")
def emb():
    return WordLlamaEmbedder()


def vec(emb, text):
    return emb.embed([text])[0]


def test_bounds_tighten_and_promote():
    b = Bounds()
    assert not b.refuses(0.95, 0.02) and not b.promotes(0.95, 0.02)
    b.learn(0.80, True)
    assert b.promotes(0.81, 0.02) and not b.promotes(0.79, 0.02)
    b.learn(0.85, False)  # a wrong answer this close: nothing up to 0.87 is served, promoted or not
    assert b.refuses(0.86, 0.02) and not b.promotes(0.86, 0.02) and b.promotes(0.90, 0.02)
    assert Bounds.from_json(b.to_json()) == b


def test_the_error_budget_holds_on_a_stream_with_a_known_wrong_hit_rate():
    """Synthetic: a query's decision probability p is uniform in [0.5, 1); a hit needs p >= 0.6
    plus the strictness, and is wrong with probability 0.4 * (1 - p) / 0.5 (about 15% served
    wrong at strictness 0). Every hit is audited. The budget (2%) must bring the wrong share of
    what it serves under the budget and keep it there; it must still serve."""
    rng = random.Random(7)
    budget = ErrorBudget(budget=0.02, window=200, min_audits=20, step=0.01, max_strictness=0.4)
    served = wrong_late = served_late = 0
    for i in range(60000):
        p = rng.uniform(0.5, 1.0)
        if p < 0.6 + budget.strictness:
            continue
        served += 1
        wrong = rng.random() < 0.4 * (1 - p) / 0.5
        if i >= 30000:
            served_late += 1
            wrong_late += wrong
        budget.observe(wrong)
    # (the least strictness that keeps 2% is 0.35: 0.4 * (0.4 - s) <= 0.02; it still serves)
    assert 0.33 <= budget.strictness <= 0.4 and served_late > 500
    assert wrong_late / served_late <= 0.02, (wrong_late, served_late)


def test_a_wrong_verdict_tightens_and_a_verified_rephrasing_promotes(tmp_path, emb):
    s = SemanticStore(str(tmp_path), emb.dim, embed=emb.embed)
    q0, a0 = "How do I reset my password?", {"text": "Use the reset link."}
    s.insert("ns", "acme", vec(emb, q0), q0, a0, 60, 100)
    eid = next(iter(s.meta))
    q1 = "How can I reset my password?"
    entry, score, hit, _ = s.lookup("ns", vec(emb, q1), q1, 0.9)
    assert entry == a0 and hit == eid
    s.learn("ns", eid, score, same=False)  # an audit said the model answers q1 otherwise
    assert s.lookup("ns", vec(emb, q1), q1, 0.9)[:2] == (None, "verifier:tightened")
    assert s.stats["semantic_veto_tightened"] == 1

    # promotion: a query the rules refuse (words moved), then verified to mean the same
    q2 = "My password, how do I reset it?"
    score2 = float(vec(emb, q2) @ vec(emb, q0))
    t = SemanticStore(str(tmp_path / "p"), emb.dim, embed=emb.embed)
    t.insert("ns", "acme", vec(emb, q0), q0, a0, 60, 100)
    eid = next(iter(t.meta))
    threshold = score2 - 0.01
    assert t.lookup("ns", vec(emb, q2), q2, threshold)[0] is None
    t.learn("ns", eid, score2, same=True)
    entry, _, hit, how = t.lookup("ns", vec(emb, q2), q2, threshold)
    assert entry == a0 and hit == eid and how == "promoted" and t.stats["semantic_promoted_hits"] == 1
    # what was learned survives a restart
    t.close()
    t2 = SemanticStore(str(tmp_path / "p"), emb.dim, embed=emb.embed)
    assert t2.bounds[eid].lo == pytest.approx(score2)
    assert t2.lookup("ns", vec(emb, q2), q2, threshold)[0] == a0


def test_a_near_miss_is_verified_after_the_lookup_and_bounded_per_turn(tmp_path, emb):
    s = SemanticStore(str(tmp_path), emb.dim, embed=emb.embed, verify_window=0.2)
    q0 = "How do I cancel my subscription?"
    s.insert("ns", "acme", vec(emb, q0), q0, {"text": "Settings, then Billing, then Cancel."}, 60, 100)
    first = next(iter(s.meta))
    misses = ["How do I stop my subscription?", "How can I end my subscription?", "How do I quit my subscription?"]
    for q in misses:  # each missed (or not: inserted as after a miss) and was answered alike
        s.insert("ns", "acme", vec(emb, q), q, {"text": "Settings, then Billing, then Cancel."}, 60, 100,
                 verify=True, threshold=0.95)
    assert len(s.queue) == 3 and s.stats["semantic_verifications"] == 0  # nothing ran at insert time
    assert s.verify_some(2) == 2 and len(s.queue) == 1
    s.verify_some(10)
    assert s.stats["semantic_verified_same"] == 3 and s.bounds[first].same >= 1
    groups = {s.bounds[e].group for e in s.meta if e in s.bounds}
    assert len(groups) == 1  # verified alike: one group, so they never contest each other
    # a different answer tightens the entry it was compared with
    q = "How do I pause my subscription?"
    s.insert("ns", "acme", vec(emb, q), q, {"text": "Pausing is not offered; you can cancel."}, 60, 100,
             verify=True, threshold=0.95)
    s.verify_some(10)
    assert s.stats["semantic_verified_different"] == 1


def test_audits_feed_the_namespace_budget_and_answers_compare_by_meaning(tmp_path, emb):
    s = SemanticStore(str(tmp_path), emb.dim, embed=emb.embed, budget_min_audits=2)
    q0 = "What is the capital of France?"
    s.insert("ns", "acme", vec(emb, q0), q0, {"text": "Paris is the capital of France."}, 60, 100)
    eid = next(iter(s.meta))
    s.audit("ns", eid, 0.95, "The capital of France is Paris.")
    s.audit("ns", eid, 0.95, "I like turtles very much.")
    s.audit("ns", eid, 0.93, "Bananas are yellow.")
    s.verify_some(10)
    assert s.stats["semantic_audits"] == 3 and s.stats["semantic_audit_wrong"] == 2
    assert s.budgets["ns"].strictness > 0 and s.gauges()["semantic_strict_namespaces"] == 1
    assert s.agree("Paris.", " paris. ") and not s.agree("Paris.", "")
    rows = s.explain("acme", vec(emb, q0), q0, 0.9)
    assert rows[0]["budget"]["audited"] == 3 and rows[0]["learned"]["different_at"] == pytest.approx(0.95)


def test_the_verify_queue_is_bounded(tmp_path, emb):
    s = SemanticStore(str(tmp_path), emb.dim, embed=emb.embed, verify_queue=3)
    q0 = "Where is my parcel?"
    s.insert("ns", "acme", vec(emb, q0), q0, {"text": "On its way."}, 60, 100)
    for _ in range(5):
        s.audit("ns", 1, 0.95, "On its way.")
    assert len(s.queue) == 3 and s.stats["semantic_verify_dropped"] == 2
    assert s.verify_some(100) == 3 and s.stats["semantic_verified_same"] == 3 and not s.queue
