"""Continuous batching: sequences decoded together give the same greedy tokens as one at a time,
requests join between steps, and a cancelled one leaves at the next step."""
import time
import numpy as np

import pytest

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


def test_a_stream_a_window_ahead_of_its_reader_pauses_until_credit_comes(tmp_path, demo_model):
    """window 4: four deltas, then the sequence keeps its slot but decodes nothing (and the
    worker may sleep) while another runs on; credit lets it go exactly that much further, and
    its text is what it would have been unpaused."""
    w = batcher(tmp_path, demo_model)
    alone = generate(w, "Go on and on", "t", 40)["text"]
    rid = submit(w, "Go on and on", "t", 40, stream=True, window=4)
    other = submit(w, "Something else", "u", 30, stream=True)

    def deltas(r):
        return [p for k, q, p in w.events.get(b"peer", []) if q == r and k == "d"]
    for _ in range(20):
        turn(w)
    assert len(deltas(rid)) == 4 and w.active == 2 and w.paused == 1
    assert len(deltas(other)) > 4  # the other sequence ran on meanwhile
    while w.runnable():
        turn(w)
    assert w.paused == 1 and not w.runnable() and len(deltas(rid)) == 4
    turn(w)  # (a step with every sequence paused decodes nothing and fails nothing)
    w.credit(b"peer", rid, 3)
    assert w.runnable()
    for _ in range(10):
        turn(w)
    assert len(deltas(rid)) == 7 and w.stats["llm_stream_pauses"] == 2
    w.credit(b"peer", rid, 1000)
    end = None
    while end is None:
        turn(w)
        end = next((p for k, q, p in w.events.get(b"peer", []) if q == rid and k == "end"), None)
    assert "".join(deltas(rid)) + end["text"] == alone


@pytest.mark.parametrize("top", ["critical", "standard"])
def test_while_a_higher_class_runs_lower_classes_take_bounded_turns(tmp_path, demo_model, top):
    """shared_decode 2, shared_prefill 32: while the highest class running (critical, or standard
    when no critical work is there) decodes, each step carries at most 2 background tokens being
    decoded and 32 of their prompt, the background sequences take turns, and their greedy text is
    what it is alone (a skipped step only delays)."""
    w = batcher(tmp_path, demo_model, shared_decode=2, shared_prefill=32, reserved={})
    long_prompt = "Once upon a time " * 20
    alone = {i: generate(w, f"{long_prompt} story {i}", tenant=f"solo-{i}", n=40)["text"] for i in range(3)}
    steps = []
    decode = w.engine.decode

    def spy(items):
        crit_slots = {s.idx for s in w.slots if s.seq is not None and s.seq.cls == top}
        if crit_slots:
            others = [(logits, slot) for _, _, slot, logits in items if slot not in crit_slots]
            per_slot: dict = {}
            for logits, slot in others:
                per_slot.setdefault(slot, []).append(logits)
            decoding = sum(1 for flags in per_slot.values() if flags == [True])
            steps.append((decoding, sum(len(f) for f in per_slot.values()) - decoding))
        return decode(items)
    w.engine.decode = spy
    bg = {submit(w, f"{long_prompt} story {i}", f"bg-{i}", 40, cls="background"): i for i in range(2)}
    for _ in range(3):
        turn(w)
    crit = submit(w, long_prompt + " urgent", "crit", 30, cls=top)
    turn(w)
    bg[submit(w, f"{long_prompt} story 2", "bg-2", 40, cls="background")] = 2  # its prompt enters in chunks
    got = {}
    while len(got) < 4:
        turn(w)
        for kind, rid, payload in w.events.pop(b"peer", []):
            assert kind == "end"
            got[rid] = payload["text"]
    assert len(steps) >= 30  # the critical sequence ran beside them
    assert all(decoding <= 2 and prefill <= 32 for decoding, prefill in steps), steps
    assert any(decoding == 2 for decoding, _ in steps)  # and they did take turns, not stop
    assert sum(1 for _, prefill in steps if prefill == 32) >= 2  # the late prompt came in 32 at a time
    for rid, i in bg.items():
        assert got[rid] == alone[i]
    assert crit in got


def test_a_request_queued_past_its_class_deadline_is_dropped_before_compute(tmp_path, demo_model):
    w = batcher(tmp_path, demo_model, reserved={}, queue_deadline={"critical": 10.0, "standard": 10.0,
                                                                   "background": 0.05})
    for i in range(4):  # every slot busy
        submit(w, "Go on and on", f"t{i}", 200)
    turn(w)
    late = submit(w, "Waiting", "bg", 8, cls="background")
    patient = submit(w, "Waiting too", "std", 8, cls="standard")
    time.sleep(0.1)
    turn(w)
    errors = {rid: payload for kind, rid, payload in w.events.pop(b"peer", []) if kind == "err"}
    assert errors[late][0] == 504 and errors[late][2] == "deadline_exceeded"
    assert patient not in errors and w.sched.queued()["standard"] == 1  # its class allows 10 s
    assert w.stats["llm_expired"] == 1


def test_fair_decode_gives_each_tenant_the_same_share_of_a_step(tmp_path, demo_model):
    """fair_decode 1: while two tenants of a class run, each decodes one sequence per step (a
    tenant with three takes turns among them), and every text is what it is alone."""
    w = batcher(tmp_path, demo_model, fair_decode=1, reserved={})
    alone = {i: generate(w, f"Tell me about item {i}", tenant=f"solo-{i}", n=24)["text"] for i in range(4)}
    per_step = []
    decode = w.engine.decode

    def spy(items):
        owner = {s.idx: s.seq.tenant for s in w.slots if s.seq is not None}
        counts: dict = {}
        for _, _, slot, logits in items:
            if logits:
                counts[owner[slot]] = counts.get(owner[slot], 0) + 1
        if all(logits for *_, logits in items):  # decode steps only (a prompt's last token samples too)
            per_step.append(counts)
        return decode(items)
    w.engine.decode = spy
    rids = {submit(w, f"Tell me about item {i}", "heavy" if i < 3 else "light", 24, cls="background"): i
            for i in range(4)}
    got = {}
    while len(got) < 4:
        turn(w)
        for kind, rid, payload in w.events.pop(b"peer", []):
            got[rid] = payload["text"]
    shared = [c for c in per_step if len(c) == 2]
    assert len(shared) >= 10 and all(c["heavy"] <= 1 and c["light"] <= 1 for c in shared), per_step
    for rid, i in rids.items():
        assert got[rid] == alone[i]


def test_one_request_holds_at_most_its_share_of_the_slots_and_its_wait_is_not_the_class_s(tmp_path, demo_model):
    """A streamed n = 4 whose reader never reads: its choices pause in their slots. They hold at
    most max_slots_per_request (half of the 4 slots); another tenant's request starts at once,
    and the held-back choices do not count as the class's queueing delay."""
    w = batcher(tmp_path, demo_model)
    w.submit(b"peer", 10_000, {"prompt": "Go on", "params": {"max_tokens": 200, "temperature": 0, "n": 4},
                            "tenant": "attacker", "cls": "standard", "stream": True, "window": 2})
    for _ in range(30):
        turn(w)
    assert w.active == 2 and w.paused == 2 and w.queued == 2  # two run (paused), two wait for them
    assert w.sched.oldest(w.may_start)["standard"] is None  # their wait is the request's own
    other = submit(w, "Something else", "victim", 4)
    for _ in range(20):
        turn(w)
    ends = [p for k, r, p in w.events.get(b"peer", []) if r == other and k == "end"]
    assert ends and ends[0]["finish_reason"] in ("stop", "length")


def _embed_beside_a_stream(w, inputs: list) -> tuple[int, dict, int]:
    """(turns, the embeddings answer, the stream's deltas meanwhile) of an embeddings request
    computed while a stream runs."""
    rid = submit(w, "Go on and on", "t", 200, stream=True)
    turn(w)
    w.embed(b"peer", 77, {"input": inputs, "cls": "standard"})
    turns, ended = 0, None
    before = len([1 for k, r, _ in w.events.get(b"peer", []) if r == rid])
    while ended is None:
        turn(w)
        turns += 1
        ended = next((p for k, r, p in w.events.get(b"peer", []) if r == 77), None)
    return turns, ended, len([1 for k, r, _ in w.events.get(b"peer", []) if r == rid]) - before


def test_an_embeddings_request_is_computed_between_decode_steps(tmp_path, demo_model):
    """256 long inputs had run inside one loop turn: decoding stopped for every tenant. Now a
    turn computes at most n_batch tokens of them, and a stream gets a token every turn meanwhile."""
    w = batcher(tmp_path, demo_model, n_batch=64)
    text = " ".join(["parcel delivery customs window return label"] * 12)  # ~100 tokens an input
    turns, ended, streamed = _embed_beside_a_stream(w, [text] * 20)
    assert turns >= 20 and len(ended["data"]) == 20 and ended["tokens"] > 20 * 64  # one long input a turn
    assert streamed >= turns // 2  # the stream went on meanwhile (a delta most turns: some hold a partial character)


def test_an_embeddings_request_under_way_is_not_the_class_s_queueing_delay(tmp_path, demo_model):
    w = batcher(tmp_path, demo_model, n_batch=64)
    text = " ".join(["parcel delivery customs window return label"] * 12)
    w.embed(b"peer", 1, {"input": [text] * 5, "cls": "standard"})
    assert w.oldest()["standard"] is not None  # waiting: counted
    turn(w)
    assert w.oldest()["standard"] is None  # under way: computed between steps, waiting for nothing
    w.embed(b"peer", 2, {"input": [text], "cls": "standard"})
    assert w.oldest()["standard"] is not None  # the one behind it waits


def test_one_long_embeddings_input_is_split_across_turns(tmp_path, demo_model):
    """One input near n_ctx had been computed in one call: every stream stopped for all of it."""
    w = batcher(tmp_path, demo_model, n_batch=64, embed_batch=32)
    text = " ".join(["parcel delivery customs window return label"] * 30)  # ~250 tokens, one input
    turns, ended, streamed = _embed_beside_a_stream(w, [text])
    assert ended["tokens"] > 6 * 32 and turns >= ended["tokens"] // 32  # at most n_batch tokens a turn
    assert streamed >= turns // 2
    whole = w.engine.embed(w.engine.tokenize(text))
    assert float(np.array(whole) @ np.array(ended["data"][0])) > 0.9999


def _text(events, rid) -> str:
    """A stream's text: its deltas (n = 1: the text itself) and what its end brings."""
    return "".join(p if isinstance(p, str) else p.get("text", "") for k, r, p in events if r == rid)


def test_paused_streams_give_their_slots_up_while_others_wait_and_resume_where_they_were(tmp_path, demo_model):
    """A client that never reads had kept every slot: other tenants waited out the idle timeout.
    A paused stream now leaves its slot (its KV to RAM) when work waits, and goes on, token for
    token the same, once its reader's credit comes."""
    ref = batcher(tmp_path / "ref", demo_model)
    want = generate(ref, "Tell me about parcels", "a", 24)["text"]
    w = batcher(tmp_path, demo_model, evict_paused_after=0.0)
    full = w.sched.n_slots - w.sched.reserved["critical"]  # the slots standard work may hold
    readers = [submit(w, "Tell me about parcels", "a", 24, stream=True, window=2) for _ in range(full)]
    while w.paused < full:  # each sent its window of deltas, and holds a slot
        turn(w)
    assert w.active == full and not w.evicted and not w.sched.can_take("standard")
    rid = submit(w, "The weather today is", "b", 8)
    for _ in range(200):
        turn(w)
        if any(r == rid and k == "end" for k, r, _ in w.events[b"peer"]):
            break
    else:
        raise AssertionError("the other tenant's request never ran")
    assert w.stats["llm_paused_evictions"] >= 1 and w.evicted and w.evicted_bytes > 0
    assert w.paused == full  # out of a slot or not, still paused
    for r in readers:
        w.credit(b"peer", r, 1000)
    for _ in range(500):
        turn(w)
        if all(any(r == x and k == "end" for k, x, _ in w.events[b"peer"]) for r in readers):
            break
    assert not w.evicted and w.evicted_bytes == 0 and w.active == 0
    for r in readers:
        assert _text(w.events[b"peer"], r) == want


def test_a_cancelled_stream_out_of_its_slot_is_dropped(tmp_path, demo_model):
    w = batcher(tmp_path, demo_model, evict_paused_after=0.0)
    full = w.sched.n_slots - w.sched.reserved["critical"]
    for _ in range(full):
        submit(w, "Tell me about parcels", "a", 24, stream=True, window=1)
    while w.paused < full:
        turn(w)
    submit(w, "The weather today is", "b", 8)
    while not w.evicted:
        turn(w)
    gone = w.evicted[0].rid
    w.cancel(b"peer", gone)
    turn(w)
    assert all(s.rid != gone for s in w.evicted) and w.stats["llm_cancelled"] == 1
    assert w.sched.running["standard"] == w.active  # the scheduler's count of slots in use agrees
