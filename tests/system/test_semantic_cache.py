"""The semantic cache through the daemon: a paraphrase is answered from the cache, a question
whose meaning changed is not, namespaces keep tenants and conversations apart."""
import json
import time

from helpers.http import request
from helpers.llm import metric
from helpers.wait import wait_for

from tidegate.core.state.auth import hash_key

KEYS = {"acme": "sk-acme-0123456789", "globex": "sk-globex-0123456789"}


def ask(d, text, tenant="acme", system="You are helpful.", history=(), max_tokens=6):
    msgs = [{"role": "system", "content": system}, *history, {"role": "user", "content": text}]
    body = {"model": "demo", "messages": msgs, "max_tokens": max_tokens, "temperature": 0}
    return request(d.port, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                   headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=30)


def wait_inserts(d, n):
    deadline = time.time() + 5
    while time.time() < deadline and metric(d, "tidegate_semantic_inserts_total") < n:
        time.sleep(0.1)


def test_paraphrases_hit_and_changed_meanings_miss(daemon_factory, demo_model):
    keys = [{"key_sha256": hash_key(k), "tenant": t, "name": t} for t, k in KEYS.items()]
    d = daemon_factory(workers=2, auth={"keys": keys}, cache={"semantic_timeout": 1.0},
                       inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 512}]})
    first = ask(d, "How do I reset my password?")
    assert first.headers["x-tidegate-cache"] == "miss"
    ask(d, "Book a flight from New York to Florida.")
    wait_inserts(d, 2)
    hit = ask(d, "How can I reset my password?")
    assert hit.headers["x-tidegate-cache"] == "semantic"
    assert hit.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert ask(d, "Book a flight from Florida to New York.").headers["x-tidegate-cache"] == "miss"
    assert ask(d, "How can I reset my password?", tenant="globex").headers["x-tidegate-cache"] == "miss"
    assert ask(d, "How can I reset my password?", system="You are terse.").headers["x-tidegate-cache"] == "miss"
    history = [{"role": "user", "content": "I use the mobile app."}, {"role": "assistant", "content": "OK."}]
    assert ask(d, "How can I reset my password?", history=history).headers["x-tidegate-cache"] == "miss"
    deadline = time.time() + 5
    while time.time() < deadline and metric(d, "tidegate_semantic_verifier_rejections_total") < 1:
        time.sleep(0.1)
    assert metric(d, "tidegate_semantic_hits_total") >= 1
    assert metric(d, "tidegate_semantic_verifier_rejections_total") >= 1
    # every lookup's text was embedded once; the inserts after the misses reused those vectors
    wait_for(lambda: metric(d, "tidegate_embed_texts_total") >= 4 and metric(d, "tidegate_embed_reused_total") >= 2,
             30, "the embedder's counters")


def test_semantic_entries_survive_a_restart(daemon_factory, demo_model):
    keys = [{"key_sha256": hash_key(k), "tenant": t, "name": t} for t, k in KEYS.items()]
    conf = dict(auth={"keys": keys}, cache={"semantic_timeout": 1.0},
                inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 512}]})
    d = daemon_factory(**conf)
    first = ask(d, "How do I cancel my subscription?")
    wait_inserts(d, 1)
    d.stop()  # SIGTERM: the embedder saves its index
    d = daemon_factory(server={"data_dir": d.sections["server"]["data_dir"]}, **conf)
    hit = ask(d, "How do I cancel my subscription please?")
    assert hit.headers["x-tidegate-cache"] == "semantic"
    assert hit.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]


def test_admin_cache_stats_and_purge(daemon_factory, demo_model):
    keys = [{"key_sha256": hash_key(k), "tenant": t, "name": t} for t, k in KEYS.items()]
    d = daemon_factory(workers=2, auth={"keys": keys}, cache={"semantic_timeout": 1.0},
                       inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 512}]})
    ask(d, "How do I reset my password?")
    ask(d, "How do I reset my password?", tenant="globex")
    wait_inserts(d, 2)
    assert ask(d, "How do I reset my password?").headers["x-tidegate-cache"] == "exact"
    deadline = time.time() + 5
    while time.time() < deadline:
        stats = d.admin_json("cache", "stats")["body"]
        if stats["exact_hits"] >= 1 and stats["semantic_entries"] >= 2:
            break
        time.sleep(0.2)
    assert stats["exact_hits"] >= 1 and stats["exact_inserts"] >= 2 and stats["semantic_entries"] == 2
    assert d.admin_json("cache", "purge", "--tenant", "acme")["ok"]
    time.sleep(0.5)
    assert ask(d, "How do I reset my password?").headers["x-tidegate-cache"] == "miss"  # acme: gone everywhere
    assert ask(d, "How do I reset my password?", tenant="globex").headers["x-tidegate-cache"] == "exact"
    assert ask(d, "How can I reset my password?", tenant="globex").headers["x-tidegate-cache"] == "semantic"


def test_admin_cache_explain_shows_the_nearest_entries_and_why(daemon_factory, demo_model):
    keys = [{"key_sha256": hash_key(k), "tenant": t, "name": t} for t, k in KEYS.items()]
    d = daemon_factory(workers=1, auth={"keys": keys}, cache={"semantic_timeout": 1.0},
                       inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 512}]})
    ask(d, "Transfer 500 dollars to savings.")
    ask(d, "How do I reset my password?")
    ask(d, "How do I reset my password?", tenant="globex")
    wait_inserts(d, 3)
    body = d.admin_json("cache", "explain", "Transfer 50 dollars to savings.", "--tenant", "acme")["body"]
    assert body["tenant"] == "acme" and body["threshold"] == 0.9
    top = body["nearest"][0]
    assert top["text"] == "Transfer 500 dollars to savings." and top["verdict"] == "veto:numbers" and top["score"] > 0.9
    assert top["decision"] == "veto:numbers"
    assert {r["tenant"] for r in body["nearest"]} == {"acme"}  # another tenant's entries are not shown
    body = d.admin_json("cache", "explain", "How can I reset my password?", "--tenant", "acme")["body"]
    assert body["nearest"][0]["verdict"] == "hit" and body["nearest"][0]["text"] == "How do I reset my password?"
    assert any(r["verdict"] == "below_threshold" for r in body["nearest"])  # the transfer, far away
    text = d.admin("cache", "explain", "How can I reset my password?").stdout  # every tenant, as a table
    assert "hit" in text and "globex" in text and "acme" in text


def test_the_minilm_encoder_runs_in_the_embedder_process(daemon_factory, demo_model):
    """cache.embedder = "minilm": all-MiniLM-L6-v2 from its weights package, converted once to a
    GGUF under the data dir and run by llama.cpp in the embedder process; a paraphrase's nearest
    entry is the question it rewords, far above an unrelated one."""
    import pytest
    from tidegate.core.cache import minilm
    try:
        minilm.weights_path()
    except minilm.MissingWeights as e:
        pytest.skip(str(e))
    keys = [{"key_sha256": hash_key(k), "tenant": t, "name": t} for t, k in KEYS.items()]
    d = daemon_factory(workers=1, auth={"keys": keys}, cache={"semantic_timeout": 1.0, "embedder": "minilm"},
                       inference={"enabled": True, "models": [{"name": "demo", "path": demo_model, "n_ctx": 512}]})
    ask(d, "How do I reset my password?")
    ask(d, "Book a flight from New York to Florida.")
    wait_inserts(d, 2)
    body = d.admin_json("cache", "explain", "What are the steps to change my forgotten password?", "--tenant",
                        "acme")["body"]
    near = {r["text"]: r["score"] for r in body["nearest"]}
    assert near["How do I reset my password?"] > 0.6 > near["Book a flight from New York to Florida."]
    assert list(d.dir.glob("data/embedders/minilm-*.gguf"))  # converted once, kept by its weights' hash
