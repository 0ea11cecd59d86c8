"""The semantic store: verified nearest-neighbour hits per namespace, TTL, capacity, and an index
that survives restarts and is rebuilt when its file is damaged."""
import os
import time

import pytest

from tidegate.core.cache.embedders import WordLlamaEmbedder
from tidegate.core.cache.semantic_store import SemanticStore


@pytest.fixture(scope="module")
def emb():
    return WordLlamaEmbedder()


def put(store, emb, ns, text, answer, ttl=60.0, max_entries=100, tenant="acme"):
    store.insert(ns, tenant, emb.embed([text])[0], text, {"text": answer}, ttl, max_entries)


def ask(store, emb, ns, text, threshold=0.9):
    """(entry, score) of a hit, (None, why) of a miss."""
    return store.lookup(ns, emb.embed([text])[0], text, threshold)[:2]


def test_paraphrase_hits_and_changed_meaning_does_not(tmp_path, emb):
    s = SemanticStore(str(tmp_path), emb.dim)
    put(s, emb, "ns1", "How do I reset my password?", "Use the reset link.")
    put(s, emb, "ns1", "Book a flight from New York to Florida.", "Booked NY->FL.")
    entry, score = ask(s, emb, "ns1", "How can I reset my password?")
    assert entry == {"text": "Use the reset link."} and score > 0.9
    assert ask(s, emb, "ns1", "Book a flight from Florida to New York.") == (None, "verifier:entities")
    assert s.stats["semantic_verifier_rejections"] == 1
    assert ask(s, emb, "other-namespace", "How can I reset my password?") == (None, "empty")


def test_near_variants_with_other_answers_contest_and_dense_neighbourhoods_do_not(tmp_path, emb):
    """The margin rule: a hit is contested only when another neighbour within the margin would be
    served too and its answer differs; the same answer cached twice is no contest, and a close
    neighbour the decision refuses (the reverse route) does not stop the right one."""
    s = SemanticStore(str(tmp_path), emb.dim)
    put(s, emb, "ns", "How can I reset my password?", "Use the reset link.")
    assert ask(s, emb, "ns", "How do I reset my password?")[0] == {"text": "Use the reset link."}
    put(s, emb, "ns", "How should I reset my password?", "Ask the admin.")
    assert ask(s, emb, "ns", "How do I reset my password?") == (None, "verifier:contested")
    assert s.stats["semantic_veto_contested"] == 1
    put(s, emb, "ns2", "Where is my parcel?", "On its way.")
    put(s, emb, "ns2", "Where is my parcel?", "On its way.")
    assert ask(s, emb, "ns2", "Where's my parcel?")[0] == {"text": "On its way."}
    put(s, emb, "ns3", "Book a flight from New York to Florida.", "NY->FL")
    put(s, emb, "ns3", "Book a flight from Florida to New York.", "FL->NY")
    put(s, emb, "ns3", "Book a flight from New York to Boston.", "NY->BOS")
    assert ask(s, emb, "ns3", "Please book a flight from New York to Florida.")[0] == {"text": "NY->FL"}
    # a margin of 0: only a tie contests
    t = SemanticStore(str(tmp_path / "m0"), emb.dim, margin=0.0)
    put(t, emb, "ns", "How can I reset my password?", "Use the reset link.")
    put(t, emb, "ns", "How should I reset my password?", "Ask the admin.")
    assert ask(t, emb, "ns", "How can I reset my password?")[0] == {"text": "Use the reset link."}


def test_ttl_and_capacity(tmp_path, emb):
    s = SemanticStore(str(tmp_path), emb.dim)
    put(s, emb, "ns", "What is the capital of France?", "Paris", ttl=0.1)
    time.sleep(0.15)
    assert ask(s, emb, "ns", "What is the capital of France?")[0] is None and s.stats["semantic_expired"] == 1
    for i, q in enumerate(["Explain how a hash map works.", "Write a haiku about the ocean.",
                           "Translate good morning into Spanish."]):
        put(s, emb, "ns", q, f"a{i}", max_entries=2)
    assert s.stats["semantic_evictions"] == 1 and ask(s, emb, "ns", "Explain how a hash map works.")[0] is None
    assert ask(s, emb, "ns", "Write a haiku about the ocean.")[0] == {"text": "a1"}
    assert s.purge("acme") == 2 and s.info()["entries"] == 0


def test_restart_keeps_entries_and_a_corrupt_index_is_rebuilt(tmp_path, emb):
    s = SemanticStore(str(tmp_path), emb.dim)
    put(s, emb, "ns", "How do I cancel my subscription?", "Settings > Billing.")
    s.close()
    s2 = SemanticStore(str(tmp_path), emb.dim)
    assert s2.stats["semantic_index_rebuilds"] == 0
    assert ask(s2, emb, "ns", "How do I cancel my subscription please?")[0] == {"text": "Settings > Billing."}
    s2.close()
    with open(os.path.join(str(tmp_path), "index-ns.bin"), "r+b") as f:
        f.seek(200)  # inside the graph, where hnswlib would follow bad offsets
        f.write(b"\xff" * 64)
    s3 = SemanticStore(str(tmp_path), emb.dim)
    assert s3.stats["semantic_index_rebuilds"] == 1
    assert ask(s3, emb, "ns", "How do I cancel my subscription?")[0] == {"text": "Settings > Billing."}


def test_gguf_embedder_is_the_second_plug(demo_model):
    import numpy as np
    from tidegate.core.cache.embedders import make_embedder
    e = make_embedder("gguf", demo_model)
    v = e.embed(["a cat sat", "a cat sat", "stock markets fell"])
    assert v.shape == (3, e.dim) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert float(v[0] @ v[1]) > 0.999


def test_namespaces_split_tenants_conversations_and_answer_shapes():
    from tidegate.core.cache.semantic_client import semantic_key
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    base = semantic_key("acme", "m", {"messages": msgs}, {"max_tokens": 5})
    assert base[1] == "Q"
    assert base != semantic_key("globex", "m", {"messages": msgs}, {"max_tokens": 5})
    assert base != semantic_key("acme", "m", {"messages": msgs}, {"max_tokens": 6})
    longer = [msgs[0], {"role": "user", "content": "earlier"}, {"role": "assistant", "content": "A"}, msgs[1]]
    assert base[0] != semantic_key("acme", "m", {"messages": longer}, {"max_tokens": 5})[0]
    assert semantic_key("acme", "m", {"messages": msgs + [{"role": "assistant", "content": "x"}]}, {}) is None


def test_per_tenant_policy_overrides_the_defaults():
    from tidegate.core.base import config
    from tidegate.core.cache.semantic_client import SemanticClient
    cfg = config.validate({"cache": {"semantic_tenants": [{"tenant": "acme", "enabled": False},
                                                          {"tenant": "globex", "threshold": 0.97, "ttl": 60}]}})
    sc = SemanticClient(cfg, client=None)
    assert sc.policy("acme")["enabled"] is False
    assert sc.policy("globex")["threshold"] == 0.97 and sc.policy("globex")["ttl"] == 60.0
    assert sc.policy("other")["threshold"] == 0.0  # (0: the embedder's calibrated floor, applied by the store)


def test_namespaces_are_bounded_per_tenant_and_in_all(tmp_path, emb):
    s = SemanticStore(str(tmp_path), emb.dim, max_namespaces=4, max_namespaces_per_tenant=2)
    for i in range(3):  # a tenant minting a namespace per request keeps only its last two
        put(s, emb, f"a{i}", "How do I reset my password?", "a", tenant="acme")
    assert set(s.spaces) == {"a1", "a2"} and s.stats["semantic_namespaces_evicted"] == 1
    put(s, emb, "b0", "How do I reset my password?", "b", tenant="globex")
    put(s, emb, "c0", "How do I reset my password?", "c", tenant="initech")
    put(s, emb, "d0", "How do I reset my password?", "d", tenant="umbrella")  # total cap: the oldest goes
    assert set(s.spaces) == {"a2", "b0", "c0", "d0"} and len(s.meta) == 4
    assert ask(s, emb, "a1", "How do I reset my password?") == (None, "empty")


def test_a_namespace_is_sized_by_what_it_holds():
    """Preallocated for 1,024 entries a namespace cost ~2.7 MB at creation; now it starts small
    and doubles as it fills."""
    import numpy as np
    from tidegate.core.cache.semantic_store import Namespace
    ns = Namespace("n", 256)
    assert ns.index.get_max_elements() == 16
    for i in range(40):
        v = np.random.default_rng(i).standard_normal(256).astype(np.float32)
        ns.add(v / np.linalg.norm(v), i)
    assert ns.index.get_current_count() == 40 and ns.index.get_max_elements() == 64
