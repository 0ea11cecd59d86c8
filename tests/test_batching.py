"""Continuous batching: sequences decoded together give the same greedy tokens as one at a time,
requests join between steps, and a cancelled one leaves at the next step."""
from test_prefix_cache import _ids, generate, worker

PROMPTS = ["The weather today is", "My favourite food is", "Parcels are delivered on", "Customs forms ask for",
           "A short poem about the sea:", "Ten facts about owls:"]


def test_batched_sequences_match_one_at_a_time(tmp_path, demo_model):
    w = worker(tmp_path, demo_model)
    alone = {p: generate(w, p, tenant=f"solo-{i}")["text"] for i, p in enumerate(PROMPTS)}
    rids = {}
    for i, p in enumerate(PROMPTS):
        rid = next(_ids)
        rids[rid] = p
        w._submit(b"peer", rid, {"prompt": p, "params": {"max_tokens": 12 + i, "temperature": 0},
                                 "tenant": f"batch-{i}", "cls": "standard", "stream": False})
    got, widest = {}, 0  # 6 requests, 3 usable slots: the last three join as others finish
    while len(got) < len(PROMPTS):
        w._admit()
        widest = max(widest, sum(1 for s in w.slots if s.seq))
        w._step()
        w._save_prefixes()
        for kind, rid, payload in w.events.pop(b"peer", []):
            assert kind == "end"
            got[rids[rid]] = payload["text"]
    assert widest == 3  # they really ran together (the 4th slot is reserved for critical work)
    for p in PROMPTS:  # alone: 12 tokens; batched: 12 + i, so alone is where batched starts
        assert got[p].startswith(alone[p]), p


def test_cancel_frees_the_slot_at_the_next_step(tmp_path, demo_model):
    w = worker(tmp_path, demo_model)
    w._submit(b"peer", 1, {"prompt": "Go on", "params": {"max_tokens": 500, "temperature": 0}, "tenant": "t",
                           "cls": "standard", "stream": True})
    w._admit()
    for _ in range(3):
        w._step()
    assert sum(1 for s in w.slots if s.seq) == 1
    w._cancel(1, b"peer")
    w._step()
    assert not any(s.seq for s in w.slots) and w.stats["llm_cancelled"] == 1
    assert w.sched.running["standard"] == 0
