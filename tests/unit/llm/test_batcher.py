"""Continuous batching: sequences decoded together give the same greedy tokens as one at a time,
requests join between steps, and a cancelled one leaves at the next step."""
from helpers.llm import batcher, generate, submit, turn

PROMPTS = ["The weather today is", "My favourite food is", "Parcels are delivered on", "Customs forms ask for",
           "A short poem about the sea:", "Ten facts about owls:"]


def test_batched_sequences_match_one_at_a_time(tmp_path, demo_model):
    w = batcher(tmp_path, demo_model)
    alone = {p: generate(w, p, tenant=f"solo-{i}")["text"] for i, p in enumerate(PROMPTS)}
    rids = {submit(w, p, f"batch-{i}", 12 + i): p for i, p in enumerate(PROMPTS)}
    got, widest = {}, 0  # 6 requests, 3 usable slots: the last three join as others finish
    while len(got) < len(PROMPTS):
        turn(w)
        widest = max(widest, w.active)
        for kind, rid, payload in w.events.pop(b"peer", []):
            assert kind == "end"
            got[rids[rid]] = payload["text"]
    assert widest == 3  # they really ran together (the 4th slot is reserved for critical work)
    for p in PROMPTS:  # alone: 12 tokens; batched: 12 + i, so alone is where batched starts
        assert got[p].startswith(alone[p]), p


def test_cancel_frees_the_slot_at_the_next_step(tmp_path, demo_model):
    w = batcher(tmp_path, demo_model)
    rid = submit(w, "Go on", "t", 500, stream=True)
    for _ in range(3):
        turn(w)
    assert w.active == 1
    w.cancel(b"peer", rid)
    turn(w)
    assert w.active == 0 and w.stats["llm_cancelled"] == 1
    assert w.sched.running["standard"] == 0
