"""The prefix cache is only worth having if it is invisible: greedy tokens after a hit in any tier
equal those of a cold computation. Drives the Batcher through its public API (no sockets) on
the demo model; a request under a fresh tenant is always cold, because blocks are tenant-salted."""
import os

import pytest

from helpers.llm import batcher as worker, generate
from tidegate.core.llm.prefix_cache import ParkedTier, RamTier, block_names

SYSTEM = ("You are a careful assistant for a shipping company. Answer questions about parcels, "
          "delivery windows, customs forms and returns. Keep answers short and polite. ") * 4
_n = iter(range(1, 1 << 30))


def cold(w, prompt: str) -> str:
    out = generate(w, prompt, tenant=f"cold-{next(_n)}")
    assert out["usage"]["cached_tokens"] == 0
    return out["text"]


def test_every_tier_gives_the_tokens_of_a_cold_computation(tmp_path, demo_model):
    w = worker(tmp_path, demo_model, prefix_live_tokens=0)  # (the parked live tier has its own test)
    first = generate(w, SYSTEM + "Where is my parcel?", "acme")
    assert first["usage"]["cached_tokens"] == 0 and w.stats["prefix_misses"] == 1

    # tier 1: the system prompt is still in a slot's KV
    q = SYSTEM + "How long does customs take?"
    hit = generate(w, q, "acme")
    assert w.stats["prefix_hits_live"] == 1 and hit["usage"]["cached_tokens"] >= 64
    assert hit["text"] == cold(w, q)

    # tier 2: forget what the slots hold; the RAM copy answers
    for s in w.slots:
        s.names = []
    q = SYSTEM + "Can I return a parcel?"
    hit = generate(w, q, "acme")
    assert w.stats["prefix_hits_ram"] == 1 and hit["usage"]["cached_tokens"] >= 64
    assert hit["text"] == cold(w, q)
    w.close_disk()  # one writer per disk tier: the next process opens it after this one let go

    # tier 3: a restarted worker finds the prefix on disk
    w2 = worker(tmp_path, demo_model)
    assert len(w2.disk.files) >= 1
    q = SYSTEM + "Do you deliver on Sundays?"
    hit = generate(w2, q, "acme")
    assert w2.stats["prefix_hits_disk"] == 1 and hit["usage"]["cached_tokens"] >= 64
    assert hit["text"] == cold(w2, q)


def test_tenants_do_not_share_prefixes_unless_declared(tmp_path, demo_model):
    w = worker(tmp_path / "w", demo_model)
    generate(w, SYSTEM + "Where is my parcel?", "acme")
    other = generate(w, SYSTEM + "Where is my parcel?", "globex")
    assert other["usage"]["cached_tokens"] == 0  # same words, other tenant: no hit, no timing signal

    shared = worker(tmp_path / "s", demo_model, shared_prefixes=[SYSTEM])
    generate(shared, SYSTEM + "Where is my parcel?", "acme")
    q = SYSTEM + "Where is my parcel now?"
    hit = generate(shared, q, "globex")
    assert hit["usage"]["cached_tokens"] >= 64  # the declared system prompt is shared
    assert hit["text"] == cold(w, q)  # (w does not share it: cold there)
    # but what follows the shared part stays salted: acme's question is not visible to globex
    same = block_names(shared.engine.tokenize(SYSTEM + "Where is my parcel?"), 16, "acme", 0)
    assert same != block_names(shared.engine.tokenize(SYSTEM + "Where is my parcel?"), 16, "globex", 0)


def test_damaged_or_foreign_cache_files_are_removed_not_fatal(tmp_path, demo_model):
    w = worker(tmp_path, demo_model)
    generate(w, SYSTEM + "Where is my parcel?", "acme")
    root = w.disk.root
    w.close_disk()
    (f,) = [os.path.join(root, n) for n in os.listdir(root) if n.endswith(".kv")]
    with open(f, "r+b") as fh:  # flip bytes in the payload: the checksum no longer matches
        fh.seek(-100, os.SEEK_END)
        fh.write(b"\xff" * 50)
    with open(os.path.join(root, "0" * 32 + ".kv"), "wb") as fh:
        fh.write(b"not a cache file")
    w2 = worker(tmp_path, demo_model)
    assert w2.disk.removed_bad == 1  # the foreign file, at start
    q = SYSTEM + "Where is my parcel today?"
    out = generate(w2, q, "acme")  # the corrupt one is found on use: a miss, and gone
    assert out["usage"]["cached_tokens"] == 0 and w2.disk.removed_bad == 2
    assert out["text"] == cold(w2, q)

    # a file from another model (fingerprint) or format version is skipped at start
    w2.close_disk()
    w3 = worker(tmp_path, demo_model)
    n = len(w3.disk.files)
    assert n >= 1 and w3.disk.removed_bad == 0  # the prompt was saved again, intact
    w3.disk.fingerprint = b"x" * 32
    w3.disk.files.clear()
    w3.disk._scan()
    assert len(w3.disk.files) == 0 and w3.disk.removed_bad == n


def test_prefixes_stay_live_past_the_slots(tmp_path, demo_model):
    """More tenants' system prompts than slots, asked round-robin: each prompt a slot gave up is
    parked in the KV cache (no RAM tier here), so every later ask is a live hit, sharing cells,
    with exactly the tokens of a cold computation."""
    w = worker(tmp_path, demo_model, prefix_ram_bytes=0, prefix_disk_bytes=0, reserved={})
    systems = [f"[{t}] " + SYSTEM for t in range(6)]  # 6 tenants, 4 slots
    for t, system in enumerate(systems):
        generate(w, system + "First question?", f"tenant-{t}")
    assert w.stats["prefix_misses"] == 6 and len(w.parks.entries) == 2
    for t, system in enumerate(systems):
        q = system + "Where is my parcel?"
        hit = generate(w, q, f"tenant-{t}")
        assert hit["usage"]["cached_tokens"] >= 64, t
        assert hit["text"] == cold(w, q)
    assert w.stats["prefix_hits_live"] == 6 and w.stats["prefix_hits_ram"] == 0


def test_parked_tier_is_bounded_by_ids_and_tokens_lru_first():
    parks = ParkedTier([10, 11, 12], max_tokens=64, block=16)
    a, b, c = [b"a1", b"a2"], [b"b1"], [b"c1", b"c2"]
    assert parks.admit(a, list(range(32)), "t") == (12, []) and parks.admit(b, list(range(16)), "t") == (11, [])
    assert parks.admit(a, list(range(40)), "t") == (-1, [])  # held already
    assert parks.longest([b"a1", b"zz"]) == (1, 12) and parks.longest([b"q"]) == (0, -1)
    assert parks.held(12) == (list(range(32)), "t")
    parks.touch(12)  # a is now more recent than b
    assert parks.admit(c, list(range(32)), "u") == (11, [11])  # 32 + 16 + 32 > 64: b (least recent) goes
    assert parks.tokens == 64 and set(parks.entries) == {11, 12}
    assert parks.admit([b"x"], list(range(65)), "t") == (-1, [])  # more than the whole tier
    one = ParkedTier([7], max_tokens=1000, block=16)
    one.admit(a, list(range(32)), "t")
    assert one.admit(b, list(range(16)), "t") == (7, [7])  # out of ids: the oldest goes


def test_a_live_hit_matches_token_by_token_within_a_tenant(tmp_path, demo_model):
    """A prompt that continues a cached one (same tenant) recomputes only its new tokens, past the
    last whole block, and its tokens are those of a cold computation; another tenant behind a
    declared shared prefix gets only the shared blocks."""
    shared = SYSTEM[:200]
    w = worker(tmp_path, demo_model, shared_prefixes=[shared])
    first = SYSTEM + "Where is my parcel? It was sent on Monday"
    generate(w, first, "acme")
    longer = first + " from Paris."
    hit = generate(w, longer, "acme")
    n_prompt = hit["usage"]["prompt_tokens"]
    assert n_prompt - hit["usage"]["cached_tokens"] <= 6, hit["usage"]  # only the new words
    assert hit["usage"]["cached_tokens"] % 16 != 0 or n_prompt - hit["usage"]["cached_tokens"] < 16
    assert hit["text"] == cold(worker(tmp_path / "cold", demo_model, prefix_disk_bytes=0), longer)
    other = generate(w, longer, "globex")  # the shared system prefix only: whole blocks of it
    assert other["usage"]["cached_tokens"] % 16 == 0 and other["usage"]["cached_tokens"] < n_prompt - 16


def test_ram_tier_is_bounded_by_bytes_and_lru():
    ram = RamTier(max_bytes=250)
    a, b, c = [b"a1", b"a2"], [b"b1"], [b"c1", b"c2", b"c3"]
    ram.put(a, b"x" * 100)
    ram.put(b, b"y" * 100)
    assert ram.longest([b"a1", b"a2", b"zz"]) == (2, b"a2")
    ram.get(b"a2")  # a is now more recent than b
    ram.put(c, b"z" * 100)  # over 250: the least recently used (b) goes
    assert ram.bytes == 200 and ram.longest([b"b1"]) == (0, None) and ram.longest([b"a1"]) == (1, b"a2")
    assert not ram.put([b"big"], b"q" * 300)  # larger than the whole tier: not kept


@pytest.mark.parametrize("tokens", [list(range(40)), list(range(15))])
def test_block_names_are_chained_and_cover_full_blocks_only(tokens):
    names = block_names(tokens, 16, "t")
    assert len(names) == len(tokens) // 16
    if len(names) == 2:
        other = block_names([99] + tokens[1:], 16, "t")
        assert other[0] != names[0] and other[1] != names[1]  # a change early renames everything after


def test_the_ram_tier_is_dropped_as_trim_comes_on():
    """Memory pressure (box-level trim): the inference worker drops its prefix RAM tier, once."""
    from types import SimpleNamespace
    from tidegate.core.llm.prefix_cache import RamTier
    from tidegate.workers.inference import InferenceWorker
    ram = RamTier(1 << 20)
    ram.put([b"a", b"b"], b"x" * 100)
    w = InferenceWorker.__new__(InferenceWorker)
    w.box, w.batcher = set(), SimpleNamespace(ram=ram)
    w.on_command({"op": "box", "actions": ["trim"]})
    assert ram.bytes == 0 and ram.longest([b"a", b"b"]) == (0, None)
    ram.put([b"c"], b"y")
    w.on_command({"op": "box", "actions": ["trim", "shed"]})  # still on: not again
    assert ram.bytes == 1
