"""Continuous batching over one llama.cpp context: sequences join between steps and leave when done.

The Batcher owns the sequence slots, the scheduler's queues and the prefix-cache tiers of one
model. Its public API is the whole of what the inference worker (workers/inference.py) does
with it, and what the tests drive:

    submit(peer, rid, body)   render, tokenize, check the context, queue (RequestError to refuse)
    cancel(peer, rid)         the client left: leaves at the next step
    credit(peer, rid, n)      a stream's reader took n more deltas: it may run n further ahead
    embed(peer, rid, body)    queue an embeddings request (by class); embed_step() computes it a
                              budget of tokens a turn, between decode steps
    admit()                   queued requests into free slots (classes, deadlines), cached prefixes restored
    step()                    one llama_decode over every running sequence, then sample each
    save_prefixes()           keep prompts that just went in (RAM, disk), after their first tokens left

Events for the ingress workers go through `send(peer, event)` (protocol DELTA / END / ERR / EMB).
One step decodes the decoding sequences first (one token each), then prompt chunks in what is
left of n_batch, so streams keep flowing during long prefills. Prefix tiers: 1 live KV (reuse a
slot in place or copy from another), 2 RAM (state bytes, LRU), 3 disk; see prefix_cache.py.
"""
from __future__ import annotations

import os
import time
from collections import deque
from typing import NamedTuple

import numpy as np

from tidegate.core.base.jsonlog import log
from tidegate.core.llm.chat_template import TemplateRefused, render_chat
from tidegate.core.llm.engine import Engine, LlamaError, free_sampler, grammar_parses, make_sampler
from tidegate.core.llm.prefix_cache import DiskTier, ParkedTier, RamTier, block_names, common_blocks
from tidegate.core.base.config import CLASSES
from tidegate.core.llm.scheduler import QueueFull, Scheduler
from tidegate.core.llm.structured import Bounds, SchemaError, check_grammar
from tidegate.core.messaging.protocol import DELTA, EMB, END, choice_end, delta, error_event
from tidegate.core.runtime.loop import RequestError

STATS = ("llm_requests", "llm_prompt_tokens", "llm_cached_tokens", "llm_completion_tokens", "llm_expired",
         "llm_cancelled", "llm_stream_pauses", "llm_paused_evictions", "prefix_hits_live", "prefix_hits_ram", "prefix_hits_disk", "prefix_misses")

RANK = {c: i for i, c in enumerate(CLASSES)}  # 0 = the highest


class Choices:
    """One request's n choices (n = 1: one): only the last to finish sends END, and a stream's
    window is theirs together (the reader takes their deltas as they come)."""
    __slots__ = ("left", "sent", "allowed", "windowed", "running", "paused_at")

    def __init__(self, n: int, window: int):
        self.left = n              # choices not finished yet
        self.running = 0           # choices holding a slot now (at most inference.max_slots_per_request)
        self.windowed = window > 0
        self.sent, self.allowed = 0, window  # deltas sent, deltas the reader's credit allows
        self.paused_at = 0.0       # when the window last filled

    @property
    def paused(self) -> bool:
        """Its reader is behind by the whole window."""
        return self.windowed and self.sent >= self.allowed


class BatchItem(NamedTuple):
    """One token of a llama_decode batch."""
    token: int
    pos: int
    seq_id: int
    logits: bool  # sample from this position


class Plan(NamedTuple):
    """Where a sequence's cached prompt prefix comes from (`choose`)."""
    tier: str       # "live": its slot's own KV, "slot": copied from another slot, "park": from a parked
                    # KV, "ram" / "disk": a saved state, "none": computed from the start
    blocks: int     # prompt blocks it brings
    source: object  # the other KvSlot, the park id, the RAM or disk key; None for live and none


def choose(own: int, slot: tuple, park: tuple, ram: tuple, disk: tuple) -> Plan:
    """The prefix plan: the most blocks wins; at a tie the cheaper tier (live KV in place, then
    a KV copy, then a state load from RAM, then disk). Each argument is (blocks, source)."""
    copy = Plan("park", *park) if park[0] > slot[0] else Plan("slot", *slot)
    best = max(copy.blocks, ram[0], disk[0])
    if own >= best and own:
        return Plan("live", own, None)
    if copy.blocks > own and copy.blocks >= ram[0] and copy.blocks >= disk[0]:
        return copy
    if ram[0] > own and ram[0] >= disk[0]:
        return Plan("ram", *ram)
    if disk[0] > own:
        return Plan("disk", *disk)
    return Plan("none", 0, None)


def _holds_slot(seq) -> None:
    seq.group.running += 1


class EmbedJob:
    """An embeddings request, computed up to n_batch tokens a turn between decode steps (one of
    256 inputs near n_ctx had stopped decoding for every tenant for minutes). toks/done/total:
    the input under way, how many of its tokens are in, the sum of their states."""
    __slots__ = ("peer", "rid", "cls", "inputs", "vectors", "tokens", "deadline", "started", "toks", "done",
                 "total")

    def __init__(self, peer, rid, cls: str, inputs: list, deadline: float):
        self.peer, self.rid, self.cls, self.inputs = peer, rid, cls, inputs
        self.vectors, self.tokens, self.deadline, self.started = [], 0, deadline, time.monotonic()
        self.toks, self.done, self.total = None, 0, None

    @property
    def begun(self) -> bool:
        return bool(self.vectors) or self.toks is not None


class Seq:
    """One generation request, from queue to finish."""
    __slots__ = ("peer", "rid", "cls", "deadline", "stream", "tenant", "prompt", "names", "params", "stop",
                 "max_tokens", "sampler", "slot", "pending", "n_past", "generated", "buf", "text", "sent",
                 "n_cached", "cancelled", "logit_index", "started", "first_token_at", "last", "last_step",
                 "logprobs", "lp", "choice", "n", "lead", "wait_lead", "group", "saved")

    def __init__(self, peer, rid, body, prompt, max_tokens, deadline):
        self.peer, self.rid = peer, rid
        self.cls, self.stream, self.tenant = body["cls"], body["stream"], body["tenant"]
        self.params, self.stop = body["params"], body["params"].get("stop") or []
        self.prompt, self.max_tokens, self.deadline = prompt, max_tokens, deadline
        self.names, self.sampler, self.slot, self.pending = [], None, -1, []
        self.n_past, self.generated, self.buf, self.text, self.sent = 0, [], b"", "", 0
        self.n_cached, self.cancelled, self.logit_index = 0, False, -1
        self.started, self.first_token_at, self.last = time.monotonic(), 0.0, -1
        self.last_step = -1  # the step it last decoded in (shared_decode takes turns by it)
        self.logprobs = body["params"].get("logprobs")  # None, or how many top alternatives per token
        self.lp: list = []  # logprob entries not sent yet
        self.choice, self.n, self.lead, self.wait_lead = 0, 1, None, False  # n > 1: choice i of n; lead: choice 0
        self.group: Choices | None = None  # its request's choices (set by submit)
        self.saved: bytes | None = None  # paused and out of its slot: its KV state (Batcher.evicted)

    @property
    def paused(self) -> bool:
        """Its reader is behind by the whole window: it keeps its slot but does not decode."""
        return self.group.paused


class KvSlot:
    """A sequence id in the llama context. `names` are the prompt blocks its KV holds, kept
    after its sequence finishes so a later prompt can reuse or copy them (tier 1)."""
    __slots__ = ("idx", "seq", "names", "used_at", "tokens", "tenant")

    def __init__(self, idx: int):
        self.idx, self.seq, self.names, self.used_at = idx, None, [], 0.0
        self.tokens, self.tenant = [], ""  # once free: the tokens its KV holds (prompt and answer), and whose

    def held(self) -> tuple[list[int], str]:
        """(the tokens at positions 0.. of this slot's KV, their tenant)."""
        s = self.seq
        if s is None:
            return self.tokens, self.tenant
        return (s.prompt + s.generated)[:s.n_past], s.tenant


class Batcher:
    def __init__(self, engine, model: dict, inf: dict, template: str, ram, disk, send, tick=None):
        self.engine, self.model, self.inf, self.template = engine, model, inf, template
        self.ram, self.disk, self.send = ram, disk, send
        self.tick = tick or (lambda: None)  # called between the inputs of a long embeddings request
        self.block = inf["prefix_block"]
        self.slots = [KvSlot(i) for i in range(model["max_seqs"])]
        n = len(self.slots)  # the park ids come after the slots'
        self.parks = ParkedTier(list(range(n, n + getattr(engine, "park_seqs", 0))),
                                getattr(engine, "park_cells", 0), self.block)
        self.sched = Scheduler(len(self.slots), inf["reserved"], inf["queue_max"], inf["fair_share"])
        # one request's n choices hold at most this many slots at once (a client that never reads
        # a streamed n = 8 had paused every choice in its own slot, every other tenant shut out)
        self.request_slots = inf["max_slots_per_request"] or max(1, len(self.slots) // 2)
        # (and none starts while its reader is behind: it would only take a slot to pause in)
        self.may_start = lambda seq: seq.group.running < self.request_slots and not seq.group.paused
        self.steps = 0  # decode steps taken (shared_decode turns)
        self.shared = [engine.tokenize(p) for p in inf["shared_prefixes"]]
        self.stats = {k: 0 for k in STATS}
        self.to_save: list = []  # (seq, slot) whose prompt just went in: saved after the step's events leave
        self.embeds: dict[str, deque] = {c: deque() for c in CLASSES}  # EmbedJobs waiting or under way
        self.embed_next = 0.0  # while generations run, no embeddings work before then (inference.embed_share)
        self.embed_took = 0.0  # how long the last embeddings turn took
        self.embed_cost = 0.0  # seconds a token of embeddings input took, last part (sizes the next)
        self.embed_ran = False  # a turn of it ran since a generation was last admitted
        # paused sequences whose slot another request needed: their KV waits in RAM for the reader
        self.evicted: list[Seq] = []
        self.evicted_bytes = 0
        self.bounds = Bounds.of(inf)  # what a grammar may ask of llama.cpp's parser

    @classmethod
    def open(cls, path: str, model: dict, inf: dict, data_dir: str, send, tick=None, disk: bool = True) -> "Batcher":
        """Load the model at path and set up its prefix tiers (the disk one under data_dir, unless
        the caller opens it later with open_disk: it is a store with one writer)."""
        engine = Engine(path, model["n_ctx"], model["max_seqs"], inf["n_batch"], model["threads"],
                        model["n_gpu_layers"], model["embeddings"], inf["prefix_live_entries"],
                        inf["prefix_live_tokens"], inf["embed_batch"])
        template = model["chat_template"] or engine.chat_template()
        b = cls(engine, model, inf, template, RamTier(inf["prefix_ram_bytes"]), None, send, tick)
        if disk:
            b.open_disk(data_dir)
        return b

    def open_disk(self, data_dir: str) -> None:
        """Tier 3, when configured: DATA_DIR/prefix-cache/MODEL under its lock (StoreLocked if held)."""
        if self.inf["prefix_disk_bytes"] and self.disk is None:
            self.disk = DiskTier(os.path.join(data_dir, "prefix-cache", self.model["name"]),
                                 self.inf["prefix_disk_bytes"], self.engine.fingerprint, self.block, log)

    def close_disk(self) -> None:
        if self.disk is not None:
            disk, self.disk = self.disk, None
            disk.close()

    @property
    def active(self) -> int:
        """Sequences decoding now."""
        return sum(1 for s in self.slots if s.seq)

    @property
    def queued(self) -> int:
        return sum(self.sched.queued().values())

    # ---- requests -----------------------------------------------------------------------------
    def submit(self, peer: bytes, rid, body: dict) -> None:
        if "messages" in body:
            try:
                text = render_chat(self.template, body["messages"], tools=body.get("tools"))
            except TemplateRefused as e:
                raise RequestError(400, f"the model's chat template refused these messages: {str(e)[:500]}",
                                   "invalid_messages", "messages") from None
        else:
            text = body["prompt"]
        if len(text.encode("utf-8")) > self.inf["max_prompt_bytes"]:
            raise RequestError(400, f"prompt is larger than {self.inf['max_prompt_bytes']} bytes", "prompt_too_large",
                               "messages" if "messages" in body else "prompt")
        prompt = self.engine.tokenize(text, add_bos=True)
        n_ctx = self.model["n_ctx"]
        max_tokens = body["params"].get("max_tokens") or self.inf["default_max_tokens"]
        if len(prompt) + max_tokens > n_ctx:
            if body["params"].get("max_tokens") or len(prompt) >= n_ctx:
                raise RequestError(400, f"This model's maximum context length is {n_ctx} tokens. However, you "
                                   f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, "
                                   f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                                   "context_length_exceeded", "messages" if "messages" in body else "prompt")
            max_tokens = n_ctx - len(prompt)  # the default only: shorten it to what fits
        grammar = body["params"].get("grammar")
        if grammar is not None:  # (checked at the ingress too: here, because a crash here is everyone's)
            try:
                check_grammar(grammar if isinstance(grammar, str) else "", "response_format", self.bounds)
            except SchemaError as e:
                raise RequestError(400, str(e), "invalid_parameter", e.param) from None
        if grammar is not None and (not isinstance(grammar, str) or not grammar_parses(self.engine.vocab, grammar)):
            raise RequestError(400, "'response_format' gives a grammar llama.cpp cannot parse", "invalid_parameter",
                               "response_format")
        bias = body["params"].get("logit_bias") or {}
        if any(not k.isascii() or not k.isdigit() or int(k) >= self.engine.n_vocab for k in bias):
            raise RequestError(400, f"'logit_bias' names a token id outside the vocabulary (0 to "
                               f"{self.engine.n_vocab - 1})", "invalid_parameter", "logit_bias")
        wait = min(body.get("timeout") or 1e9, self.inf["request_timeout"], self.inf["queue_deadline"][body["cls"]])
        n = body["params"].get("n") or 1
        seqs = [Seq(peer, rid, body, prompt, max_tokens, time.monotonic() + wait) for _ in range(n)]  # dropped
        group = Choices(n, (body.get("window") or 0) if body["stream"] else 0)
        for i, seq in enumerate(seqs):                                                            # unserved after wait
            seq.choice, seq.n, seq.lead, seq.group = i, n, seqs[0] if i else None, group
        try:
            self.sched.submit_all(seqs, seqs[0].cls)
        except QueueFull:
            raise RequestError(503, f"too many {seqs[0].cls} requests are waiting for the model; retry shortly",
                               "queue_full", None) from None

    def cancel(self, peer: bytes, rid) -> None:
        for q in self.embeds.values():
            for job in [j for j in q if j.rid == rid and j.peer == peer]:
                q.remove(job)
        for s in self.slots:
            if s.seq and s.seq.rid == rid and s.seq.peer == peer:
                s.seq.cancelled = True
        for seq in self.evicted:
            if seq.rid == rid and seq.peer == peer:
                seq.cancelled = True
        for seq in self.sched.remove(lambda q: q.rid == rid and q.peer == peer):
            self.stats["llm_cancelled"] += 1

    def credit(self, peer: bytes, rid, n) -> None:
        if not isinstance(n, int) or n <= 0:
            return
        for seq in [s.seq for s in self.slots if s.seq] + self.evicted:
            if seq.rid == rid and seq.peer == peer and seq.group.windowed:
                seq.group.allowed += n
                return  # (the choices share one window; a credit only follows deltas: never for a queued one)

    def runnable(self) -> bool:
        """Some sequence can decode now (not every running one is paused for its reader)."""
        return any(s.seq and (not s.seq.paused or s.seq.pending or s.seq.cancelled) for s in self.slots)

    @property
    def paused(self) -> int:
        return sum(1 for s in self.slots if s.seq and s.seq.paused) + len(self.evicted)

    def embed(self, peer: bytes, rid, body: dict) -> None:
        """Queue an embeddings request in its class (the class's queue_max bounds it)."""
        if self.engine.embed_ctx is None:
            raise RequestError(400, f"model {self.model['name']!r} is not configured for embeddings", "model_not_supported",
                               "model")
        cls = body.get("cls") if body.get("cls") in CLASSES else "standard"
        q = self.embeds[cls]
        if len(q) + self.sched.depth[cls] >= self.sched.queue_max[cls]:
            raise RequestError(503, f"too many {cls} requests are waiting for the model; retry shortly",
                               "queue_full", None)
        wait = min(body.get("timeout") or 1e9, self.inf["request_timeout"], self.inf["queue_deadline"][cls])
        q.append(EmbedJob(peer, rid, cls, list(body["input"]), time.monotonic() + wait))

    def embed_step(self) -> None:
        """Embeddings work for one turn: up to embed_batch tokens and about embed_turn_ms (a long
        input of a causal model goes on next turn; what arrives meanwhile waits that long at most),
        highest class first, so decode steps keep coming between them. A finished request is
        answered; one that waited past its deadline before any of it was computed is dropped (504)."""
        budget, now = self.inf["embed_batch"], time.monotonic()
        until = now + self.inf["embed_turn_ms"] / 1000
        if self.active and now < self.embed_next:
            return  # generations run: embeddings take at most their share of the model's time
        eng = self.engine
        for cls in CLASSES:
            q = self.embeds[cls]
            while q and budget > 0 and (not self.embed_cost or time.monotonic() < until):
                job = q[0]
                if not job.begun and job.deadline <= now:
                    q.popleft()
                    self.stats["llm_expired"] += 1
                    self.send(job.peer, error_event(job.rid, 504, "request deadline passed while it waited for the "
                                                    "model", "deadline_exceeded"))
                    continue
                if job.toks is None:
                    job.toks = eng.tokenize(job.inputs[len(job.vectors)], add_bos=True)
                    job.done, job.total = 0, np.zeros(eng.n_embd, dtype=np.float64)
                    if len(job.toks) > self.model["n_ctx"]:
                        q.popleft()
                        self.send(job.peer, error_event(job.rid, 400, f"input of {len(job.toks)} tokens exceeds the "
                                                        f"model's context of {self.model['n_ctx']}",
                                                        "context_length_exceeded", "input"))
                        continue
                part = len(job.toks) - job.done  # (an encoder's input goes in whole)
                if eng.embed_causal:
                    part = min(part, eng.embed_chunk, budget)
                    if self.embed_cost:  # a part takes about embed_turn_ms at most
                        part = min(part, max(8, int((until - time.monotonic()) / self.embed_cost)))
                t0 = time.monotonic()
                job.total += eng.embed_part(job.toks, job.done, part)
                self.embed_cost = (time.monotonic() - t0) / part
                job.done += part
                budget -= part
                self.tick()
                if job.done >= len(job.toks):
                    job.vectors.append(eng.embed_finish(job.total, len(job.toks)))
                    job.tokens += len(job.toks)
                    job.toks = job.total = None
                    if len(job.vectors) == len(job.inputs):
                        q.popleft()
                        self.send(job.peer, [EMB, job.rid, {"data": job.vectors, "tokens": job.tokens}])
        share, took = self.inf["embed_share"], time.monotonic() - now
        self.embed_next, self.embed_took, self.embed_ran = now + took / share, took, True

    @property
    def embedding(self) -> int:
        return sum(len(q) for q in self.embeds.values())

    def oldest(self) -> dict:
        """class -> when its oldest waiting work began (a generation that could start, an
        embeddings request), None when none waits: the class's queueing delay."""
        out = self.sched.oldest(self.may_start)
        for c, q in self.embeds.items():
            waiting = next((j.started for j in q if not j.begun), None)  # (one under way is not waiting)
            if waiting is not None and (out[c] is None or waiting < out[c]):
                out[c] = waiting
        return out

    # ---- admission and the prefix cache -------------------------------------------------------
    def admit(self) -> None:
        self._resume_evicted()
        self._evict_paused()
        admitted, expired = self.sched.admit(time.monotonic(), self.may_start, _holds_slot)
        if admitted and self.embed_ran:  # a new generation runs its first steps before more embeddings
            self.embed_next = max(self.embed_next, time.monotonic() + self.embed_took / self.inf["embed_share"])
            self.embed_ran = False  # (once per embeddings turn: they still get their share under a flood)
        for seq in expired:
            self.stats["llm_expired"] += 1
            self.send(seq.peer, error_event(seq.rid, 504, "request deadline passed while it waited for the model",
                                            "deadline_exceeded"))
        for seq in admitted:
            self.sched.charge(seq.cls, seq.tenant, prompt_tokens=len(seq.prompt))  # fair shares count tokens
            try:
                self._start(seq)
            except LlamaError as e:
                log.error("could not start sequence", error=str(e))
                seq.group.running -= 1
                self.sched.finished(seq.cls, seq.tenant)
                self.send(seq.peer, error_event(seq.rid, 500, "inference failed", "internal"))

    # ---- paused streams out of their slots ----------------------------------------------------
    def _evict_paused(self) -> None:
        """A streamed request whose reader stopped reading keeps nothing others need: while work
        that could start waits for a slot, a sequence paused for inference.evict_paused_after
        gives its slot up, its KV saved to RAM (at most inference.paused_state_bytes in all),
        and resumes from it once its reader's credit comes and a slot is free."""
        waiting = [c for c, t in self.sched.oldest(self.may_start).items() if t is not None]
        if not waiting or all(self.sched.can_take(c) and any(s.seq is None for s in self.slots) for c in waiting):
            return
        now, after = time.monotonic(), self.inf["evict_paused_after"]
        paused = sorted((s for s in self.slots if s.seq and s.seq.paused and not s.seq.pending and not s.seq.cancelled
                         and not s.seq.wait_lead and s.seq.first_token_at and now - s.seq.group.paused_at >= after),
                        key=lambda s: s.seq.group.paused_at)
        for slot in paused[:sum(self.sched.queued()[c] for c in waiting)]:
            seq = slot.seq
            data = self.engine.state_get(slot.idx)
            if self.evicted_bytes + len(data) > self.inf["paused_state_bytes"]:
                break  # (out of room: it keeps its slot, within max_slots_per_request)
            seq.saved, self.evicted_bytes = data, self.evicted_bytes + len(data)
            self._vacate(slot)
            self.sched.suspend(seq.cls, seq.tenant)
            seq.slot = -1
            self.evicted.append(seq)
            self.stats["llm_paused_evictions"] += 1

    def _resume_evicted(self) -> None:
        """Evicted sequences whose reader caught up (credit) take a free slot before anything new
        starts (their streams are open); cancelled ones are dropped."""
        for seq in list(self.evicted):
            if not seq.cancelled and (seq.paused or not self.sched.can_take(seq.cls) or not self.may_start(seq)):
                continue
            free = [s for s in self.slots if s.seq is None]
            if not seq.cancelled and not free:
                return
            self.evicted.remove(seq)
            data, seq.saved = seq.saved, None
            self.evicted_bytes -= len(data)
            if seq.cancelled:
                self.stats["llm_cancelled"] += 1
                self.sched.completed[seq.cls] += 1
                free_sampler(seq.sampler)
                continue
            slot = min(free, key=lambda s: s.used_at)
            self.sched.resume(seq.cls, seq.tenant)
            seq.group.running += 1
            if not self.engine.state_set(slot.idx, data):
                log.error("could not restore a paused sequence's KV", tokens=seq.n_past)
                slot.seq, seq.slot = seq, slot.idx
                self._release(slot)
                self.send(seq.peer, error_event(seq.rid, 500, "inference failed", "internal"))
                continue
            slot.seq, slot.names, slot.used_at, seq.slot = seq, list(seq.names), time.monotonic(), slot.idx

    def _shared_tokens(self, prompt: list[int]) -> int:
        best = 0
        for sp in self.shared:
            n = 0
            for a, b in zip(sp, prompt):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return best

    def _start(self, seq: Seq) -> None:
        """Give seq a slot and as much of its prompt from the cache as there is. Choice i > 0 of
        an n > 1 request whose first choice is computing the prompt now waits for it: it gets a
        copy of that prompt's KV (one prefill for all n) and its first token from the same logits."""
        lead = seq.lead
        if lead is not None and lead.slot >= 0 and not lead.first_token_at and not lead.cancelled:
            slot = min((s for s in self.slots if s.seq is None), key=lambda s: s.used_at)
            slot.names, slot.seq, slot.used_at = [], seq, time.monotonic()
            seq.slot, seq.pending, seq.wait_lead = slot.idx, [], True
            seq.sampler = self._sampler(seq)
            return
        B = self.block
        seq.names = block_names(seq.prompt, B, seq.tenant, self._shared_tokens(seq.prompt))
        limit = (len(seq.prompt) - 1) // B  # leave at least one token to compute logits from
        want = seq.names[:limit]
        free = [s for s in self.slots if s.seq is None]
        # tier 1: the free slot that already holds the longest prefix, else the least recently used
        own = max(free, key=lambda s: (common_blocks(s.names, want), -s.used_at))
        slot = own if common_blocks(own.names, want) else min(free, key=lambda s: s.used_at)
        got, how = common_blocks(slot.names, want), "live"
        if got < len(slot.names):
            self._park(slot)  # what the slot held beyond the shared part would be lost: keep it live
        donor = max((s for s in self.slots if s is not slot), key=lambda s: common_blocks(s.names, want),
                    default=None)
        plan = choose(got, (common_blocks(donor.names, want), donor) if donor else (0, None), self.parks.longest(want),
                      self.ram.longest(want), self.disk.longest(want) if self.disk else (0, None))
        eng = self.engine
        n = got * B  # tokens cached: whole blocks, then (live) token by token
        if plan.tier in ("slot", "park"):
            src = plan.source.idx if plan.tier == "slot" else plan.source
            held = plan.source.held() if plan.tier == "slot" else self.parks.held(plan.source)
            n = self._extend(plan.blocks * B, held, seq)
            eng.seq_copy(src, slot.idx, n)
            if plan.tier == "park":
                self.parks.touch(plan.source)
            got = plan.blocks
        elif plan.tier == "live":
            n = self._extend(n, slot.held(), seq)
        elif plan.tier == "ram":
            got, how = (plan.blocks, "ram") if eng.state_set(slot.idx, self.ram.get(plan.source)) else (0, "")
        elif plan.tier == "disk":
            data = self.disk.get(plan.source)
            if data is not None and eng.state_set(slot.idx, data):
                got, how = plan.blocks, "disk"
                self.ram.put(self.disk.files.get(plan.source, (want[:plan.blocks], 0))[0], data)
            else:
                got = 0
        else:
            got = 0
        if how != "live":
            n = got * B
        if got:
            eng.seq_keep(slot.idx, n)
            self.stats[f"prefix_hits_{how}"] += 1
        else:
            eng.seq_clear(slot.idx)
            self.stats["prefix_misses"] += 1
        slot.names = want[:got]
        slot.seq, slot.used_at = seq, time.monotonic()
        seq.slot, seq.n_cached, seq.n_past = slot.idx, n, n
        seq.pending = seq.prompt[n:]
        seq.sampler = self._sampler(seq)

    @staticmethod
    def _extend(n: int, held: tuple[list[int], str], seq: Seq) -> int:
        """n tokens matched in whole blocks, extended token by token while the source's KV (held:
        its tokens and tenant) agrees with seq's prompt, so a prompt that continues a cached one
        recomputes only what is new; at least one prompt token is left to compute. Only within a
        tenant: a block match may come from a shared (unsalted) prefix, and what follows it must
        not be learnable by timing from another tenant's prompt."""
        tokens, tenant = held
        if tenant != seq.tenant:
            return n
        prompt, end = seq.prompt, min(len(tokens), len(seq.prompt) - 1)
        while n < end and tokens[n] == prompt[n]:
            n += 1
        return n

    def _park(self, slot: KvSlot) -> None:
        """Keep what slot's KV holds (its prompt blocks' tokens and what followed) under a park id
        (shared cells, no copy)."""
        if len(slot.names) * self.block < self.inf["prefix_min_tokens"]:
            return
        pid, evicted = self.parks.admit(slot.names, slot.tokens, slot.tenant)
        for e in evicted:
            self.engine.seq_clear(e)
        if pid >= 0:
            self.engine.seq_copy(slot.idx, pid, len(slot.tokens))

    def _sampler(self, seq: Seq):
        p, eng = seq.params, self.engine
        seed = p.get("seed") if p.get("seed") is not None else int.from_bytes(os.urandom(4), "little")
        return make_sampler(eng.n_vocab, p.get("temperature", 1.0), p.get("top_p", 1.0), p.get("top_k", 0),
                            p.get("min_p", 0.0), (seed + seq.choice) & 0xFFFFFFFF,  # n > 1: each choice its own
                            {int(k): v for k, v in (p.get("logit_bias") or {}).items()},
                            p.get("presence_penalty", 0.0), p.get("frequency_penalty", 0.0),
                            p.get("repeat_penalty", 1.0), p.get("grammar"), eng.vocab)

    def save_prefixes(self) -> None:
        """Keep prompts that just went into the KV in RAM (and on disk) when that adds enough new
        tokens. Runs after the step's first tokens were sent, before the next step changes the KV,
        so copying the state never delays a first token."""
        for seq, slot in self.to_save:
            if slot.seq is not None and slot.seq is not seq:
                continue  # the slot went to another sequence: its KV is not this prompt any more
            have = max(self.ram.longest(seq.names)[0], self.disk.longest(seq.names)[0] if self.disk else 0)
            if (len(seq.names) - have) * self.block < self.inf["prefix_min_tokens"] or not self.ram.max_bytes:
                continue
            data = self.engine.state_get(slot.idx)
            # the KV holds the prompt only (the sampled token is decoded next step)
            self.ram.put(seq.names, data)
            if self.disk:
                self.disk.put(seq.names, data)
        self.to_save.clear()

    # ---- one decode step ----------------------------------------------------------------------
    def _tenant_turns(self, running: list) -> dict | None:
        """fair_decode: (class, tenant) -> sequences it may decode this step, for each class with
        more than one tenant running (each tenant gets the same share of a step, however many
        sequences it runs; theirs take turns). None when off or nobody shares."""
        k = self.inf["fair_decode"]
        if not k or not self.sched.fair:
            return None
        tenants: dict = {}
        for s in running:
            tenants.setdefault(s.cls, set()).add(s.tenant)
        turns = {(c, t): k for c, ts in tenants.items() if len(ts) > 1 for t in ts}
        return turns or None

    def step(self) -> None:
        for slot in self.slots:
            seq = slot.seq
            if seq and seq.cancelled:
                self.stats["llm_cancelled"] += 1
                self._release(slot)
        running = [s.seq for s in self.slots if s.seq]
        if not running:
            return
        for seq in running:  # a choice whose lead is gone (failed, cancelled) computes the prompt itself
            if seq.wait_lead and self.slots[seq.lead.slot].seq is not seq.lead:
                self.engine.seq_clear(seq.slot)
                seq.wait_lead, seq.pending, seq.n_past = False, list(seq.prompt), 0
        top = min(RANK[s.cls] for s in running)
        below = any(RANK[s.cls] > top for s in running)  # lower classes run beside the highest
        items = self._decoding(running, top, below)
        self.steps += 1
        self._prefilling(running, top, below, items)
        if not items:  # every running sequence is paused for its reader (or waits its turn)
            return
        self.engine.decode(items)
        now = time.monotonic()
        for seq in running:
            if seq.logit_index < 0:
                continue
            slot = self.slots[seq.slot]
            if not seq.generated and not seq.first_token_at:
                seq.first_token_at = now
                slot.names = seq.names
                self.to_save.append((seq, slot))
                if seq.n > 1:
                    self._followers_join(seq, now)
            self._take(seq, slot, seq.logit_index)

    def _decoding(self, running: list, top: int, below: bool) -> list[BatchItem]:
        """One token for each decoding sequence that may decode this step. The highest class
        running is protected: while it runs, at most shared_decode sequences of lower classes
        decode in a step (taking turns, longest-waiting first), so what they add to each of its
        tokens stays bounded; fair_decode shares a step between a class's tenants."""
        items: list[BatchItem] = []
        others = self.inf["shared_decode"] if below else len(running)
        per_tenant = self._tenant_turns(running)
        for seq in sorted(running, key=lambda s: (RANK[s.cls] > top, s.last_step)):
            seq.logit_index = -1
            if seq.pending or seq.wait_lead or seq.paused:
                continue
            if per_tenant is not None:
                key = (seq.cls, seq.tenant)
                if per_tenant.get(key, 1) <= 0:
                    continue
                if key in per_tenant:
                    per_tenant[key] -= 1
            if RANK[seq.cls] > top:
                if others <= 0:
                    continue
                others -= 1
            seq.last_step = self.steps
            seq.logit_index = len(items)
            items.append(BatchItem(seq.last, seq.n_past, seq.slot, True))
            seq.n_past += 1
        return items

    def _prefilling(self, running: list, top: int, below: bool, items: list) -> None:
        """Prompt chunks in what is left of n_batch after the decoding tokens; lower classes'
        prompts enter in small chunks (a step, and so each of its tokens, waits on at most
        shared_prefill tokens of theirs)."""
        budget = self.inf["n_batch"] - len(items)
        shared = self.inf["shared_prefill"] if below else budget
        for seq in sorted(running, key=lambda s: RANK[s.cls] > top):
            room = budget if RANK[seq.cls] == top else min(budget, shared)
            if not seq.pending or room <= 0:
                continue
            chunk, seq.pending = seq.pending[:room], seq.pending[room:]
            if RANK[seq.cls] > top:
                shared -= len(chunk)
            for tok in chunk:
                items.append(BatchItem(tok, seq.n_past, seq.slot, False))
                seq.n_past += 1
            budget -= len(chunk)
            if not seq.pending:  # the prompt is in: sample its first token
                seq.logit_index = len(items) - 1
                items[-1] = items[-1]._replace(logits=True)

    def _take(self, seq: Seq, slot: KvSlot, index: int) -> None:
        """Sample seq's next token from the logits at batch position index, note its logprobs, accept it."""
        tok = self.engine.sample(seq.sampler, index)
        if seq.logprobs is not None and not self.engine.is_eog(tok):
            seq.lp.append(self._logprob(index, tok, seq.logprobs))
        self._accept(seq, slot, tok)

    def _followers_join(self, lead: Seq, now: float) -> None:
        """The lead's prompt is in: each choice waiting for it copies the KV and samples its first
        token from the lead's logits (before the lead's own token, which may end it)."""
        for s in self.slots:
            f = s.seq
            if f is None or not f.wait_lead or f.lead is not lead:
                continue
            self.engine.seq_copy(lead.slot, f.slot, lead.n_past)
            f.n_past, f.n_cached, f.wait_lead, f.first_token_at = lead.n_past, lead.n_past, False, now
            s.names = lead.names
            self._take(f, s, lead.logit_index)

    def _logprob(self, index: int, tok: int, k: int) -> list:
        """[token text, logprob, bytes, [[text, logprob, bytes], ...]]: one entry of logprobs."""
        eng = self.engine
        lp, top = eng.logprobs(index, tok, k)
        piece = eng.piece(tok)
        return [piece.decode("utf-8", "replace"), lp, list(piece),
                [[(b := eng.piece(t)).decode("utf-8", "replace"), v, list(b)] for t, v in top]]

    def _accept(self, seq: Seq, slot: KvSlot, tok: int) -> None:
        eng = self.engine
        if eng.is_eog(tok):
            return self._finish(seq, slot, "stop")
        seq.generated.append(tok)
        seq.last = tok
        self.sched.charge(seq.cls, seq.tenant, output_tokens=1)
        seq.buf += eng.piece(tok)
        try:  # hold back an incomplete UTF-8 sequence until its last byte arrives
            seq.text += seq.buf.decode("utf-8")
            seq.buf = b""
        except UnicodeDecodeError as e:
            if e.start < len(seq.buf) - 3:
                seq.text += seq.buf.decode("utf-8", "replace")
                seq.buf = b""
        if seq.stop:
            look = max(0, seq.sent - max(len(s) for s in seq.stop))
            cut = min((i for i in (seq.text.find(s, look) for s in seq.stop) if i >= 0), default=-1)
            if cut >= 0:
                seq.text = seq.text[:cut]
                return self._finish(seq, slot, "stop")
        if len(seq.generated) >= seq.max_tokens or seq.n_past + 1 >= self.model["n_ctx"]:
            return self._finish(seq, slot, "length")
        if seq.stream:
            # a stop string may be forming at the end: hold back what could be its start
            hold = max((len(s) - 1 for s in seq.stop), default=0)
            upto = len(seq.text) - hold
            if upto > seq.sent:
                text = seq.text[seq.sent:upto]
                # the tokens decoded since the last delta travel with it (when logprobs were asked for)
                self.send(seq.peer, [DELTA, seq.rid, delta(text, seq.lp if seq.logprobs is not None else None,
                                                           seq.choice if seq.n > 1 else None)])
                seq.lp = []
                seq.sent = upto
                g = seq.group
                if g.windowed:
                    g.sent += 1
                    if g.sent == g.allowed:
                        self.stats["llm_stream_pauses"] += 1
                        g.paused_at = time.monotonic()

    def _finish(self, seq: Seq, slot: KvSlot, reason: str) -> None:
        if seq.buf:
            seq.text += seq.buf.decode("utf-8", "replace")
        usage = {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.generated),
                 "total_tokens": len(seq.prompt) + len(seq.generated), "cached_tokens": seq.n_cached}
        end = {"text": seq.text[seq.sent:], "finish_reason": reason, "usage": usage,
               "ttft_ms": round((seq.first_token_at - seq.started) * 1000, 3)}
        if seq.logprobs is not None:
            end["logprobs"] = seq.lp
        if seq.n > 1:
            end["index"] = seq.choice
            seq.group.left -= 1
            if seq.group.left:  # others still run: this choice's end travels as a delta
                self.send(seq.peer, [DELTA, seq.rid, choice_end(seq.choice, end)])
            else:
                self.send(seq.peer, [END, seq.rid, end])
        else:
            self.send(seq.peer, [END, seq.rid, end])
        st = self.stats
        st["llm_requests"] += 1
        st["llm_prompt_tokens"] += len(seq.prompt)
        st["llm_cached_tokens"] += seq.n_cached
        st["llm_completion_tokens"] += len(seq.generated)
        self._release(slot)

    def _release(self, slot: KvSlot) -> None:
        seq = slot.seq
        self._vacate(slot)
        free_sampler(seq.sampler)
        self.sched.finished(seq.cls, seq.tenant)

    def _vacate(self, slot: KvSlot) -> None:
        """slot's sequence leaves it (finished, or evicted while paused); its KV stays for reuse."""
        seq, slot.seq = slot.seq, None
        seq.group.running -= 1
        if len(slot.names) * self.block > seq.n_past:  # cut short before its prompt was in
            slot.names = slot.names[: seq.n_past // self.block]
        slot.tokens, slot.tenant = (seq.prompt + seq.generated)[:seq.n_past], seq.tenant
        slot.used_at = time.monotonic()
