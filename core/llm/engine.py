"""llama.cpp through llama-cpp-python's low-level bindings: one model, one context, many sequences.

Only the per-sequence C API is used (llama_batch with several seq ids and one llama_decode per
step, llama_memory_seq_* for KV moves, llama_state_seq_* for KV bytes), never the high-level
`Llama` object: its prompt caches keep a full logits array per entry and were measured slower
than recomputing. The KV cache is unified (`kv_unified`), so a sequence may copy a prefix from
another one (partial copies assert otherwise), and the context holds n_ctx cells per sequence.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os

import llama_cpp as L
import numpy as np

_backend_ready = False


class LlamaError(RuntimeError):
    pass


ALL_LAYERS = 999  # an n_gpu_layers past the model's layer count offloads every one (as llama.cpp's tools do)


def gpu_layers(setting, can_offload: bool) -> int:
    """llama.cpp's n_gpu_layers for the config value: "auto" is every layer when this build can
    offload to a GPU (llama_supports_gpu_offload: a CUDA/Metal/Vulkan backend with a device), else 0."""
    if setting == "auto":
        return ALL_LAYERS if can_offload else 0
    return int(setting)


def backend_init() -> None:
    """llama.cpp's backend, once per process, with its log quieted (warnings and errors only)."""
    global _backend_ready
    if not _backend_ready:
        L.llama_backend_init()
        L.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        _backend_ready = True


class Engine:
    def __init__(self, path: str, n_ctx: int, n_seq: int, n_batch: int = 512, threads: int = 0,
                 n_gpu_layers="auto", embeddings: bool = False, park_seqs: int = 0, park_cells: int = 0,
                 embed_batch: int = 0, embed_seqs: int = 1):
        """n_seq sequences of up to n_ctx tokens each, plus park_seqs ids that only hold prefixes
        (in park_cells more cells): see prefix_cache.ParkedTier. embed_batch: embeddings tokens per
        llama_decode (0 = n_batch). embed_seqs: a non-causal encoder's inputs packed into one
        llama_decode (embed_many), up to max(n_ctx, 512) tokens in all."""
        backend_init()
        if not os.path.exists(path):
            raise LlamaError(f"model file not found: {path}")
        mp = L.llama_model_default_params()
        self.gpu = bool(L.llama_supports_gpu_offload())
        mp.n_gpu_layers = gpu_layers(n_gpu_layers, self.gpu)
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise LlamaError(f"llama.cpp could not load {path}")
        self.path, self.n_ctx, self.n_seq, self.n_batch = path, n_ctx, n_seq, n_batch
        self.park_seqs, self.park_cells = (park_seqs, park_cells) if park_seqs and park_cells else (0, 0)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_embd = L.llama_model_n_embd(self.model)
        n_layer = L.llama_model_n_layer(self.model)
        self.offloaded = min(mp.n_gpu_layers, n_layer) if self.gpu else 0  # layers that run on the GPU
        threads = threads or max(1, len(os.sched_getaffinity(0)))  # (the CPUs this process may use)
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq + self.park_cells  # unified KV: n_ctx cells for each sequence
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq + self.park_seqs
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise LlamaError("llama.cpp could not create a context (out of memory?)")
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(n_batch, 0, n_seq + self.park_seqs)
        self.embed_ctx = None
        if embeddings:
            # A causal model's mean-pooled embedding is the mean of its token states, which do not
            # depend on later tokens: a long input is computed n_batch tokens a turn, through the
            # context's own KV (one near n_ctx had stopped decoding for everyone in one call). A
            # non-causal encoder must see the whole input in one batch.
            self.embed_causal = self._causal()
            self.embed_chunk = min(n_ctx, embed_batch or n_batch) if self.embed_causal else n_ctx
            self.embed_seqs = 1 if self.embed_causal else max(1, embed_seqs)
            # (packed inputs attend within their own sequence only, but the mask is tokens x tokens:
            # the packing budget stays small)
            self.embed_pack = self.embed_chunk if self.embed_seqs == 1 else max(n_ctx, 512)
            ep = L.llama_context_default_params()
            ep.n_ctx = n_ctx if self.embed_seqs == 1 else self.embed_pack  # (a causal input's parts share the KV)
            ep.n_batch = ep.n_ubatch = self.embed_pack
            ep.n_seq_max = self.embed_seqs
            ep.n_threads = ep.n_threads_batch = threads
            ep.embeddings = True
            ep.pooling_type = L.LLAMA_POOLING_TYPE_NONE  # token states, pooled here across chunks
            self.embed_ctx = L.llama_init_from_model(self.model, ep)
            if not self.embed_ctx:
                raise LlamaError("llama.cpp could not create the embeddings context (out of memory?)")
            self._ebatch = L.llama_batch_init(self.embed_pack, 0, 1)
        self.fingerprint = model_fingerprint(path)
        self._piece = ctypes.create_string_buffer(256)
        self._state_buf = None

    # ---- text ---------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n = len(data) + 8
        buf = (L.llama_token * n)()
        k = L.llama_tokenize(self.vocab, data, len(data), buf, n, add_bos, True)
        if k < 0:
            buf = (L.llama_token * -k)()
            k = L.llama_tokenize(self.vocab, data, len(data), buf, -k, add_bos, True)
        return list(buf[:k])

    def piece(self, token: int) -> bytes:
        n = L.llama_token_to_piece(self.vocab, token, self._piece, 256, 0, False)
        return self._piece.raw[:n] if n > 0 else b""

    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    def chat_template(self) -> str | None:
        t = L.llama_model_chat_template(self.model, None)
        return t.decode("utf-8", "replace") if t else None

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = L.llama_model_meta_val_str(self.model, key.encode(), buf, 512)
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    # ---- one step ----------------------------------------------------------------------------
    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode over (token, pos, seq, wants_logits) items (len <= n_batch)."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(items)
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise LlamaError(f"llama_decode failed with {rc} (KV cache full?)")

    def sample(self, sampler, index: int) -> int:
        if sampler.__class__ is LazyGrammar:
            return sampler.sample(self.ctx, index)
        return L.llama_sampler_sample(sampler, self.ctx, index)

    def logprobs(self, index: int, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        """The model's log-probability of token at batch position index, and its k most likely
        tokens with theirs (log-softmax of the raw logits, before any sampler)."""
        p = L.llama_get_logits_ith(self.ctx, index)
        x = np.ctypeslib.as_array(p, shape=(self.n_vocab,))
        m = float(x.max())
        lse = m + math.log(float(np.exp(x - m).sum()))
        top = []
        if k:
            idx = np.argpartition(-x, k)[:k]
            idx = idx[np.argsort(-x[idx])]
            top = [(int(t), float(x[t]) - lse) for t in idx]
        return float(x[token]) - lse, top

    # ---- sequences ---------------------------------------------------------------------------
    def seq_keep(self, seq: int, n: int) -> None:
        """Drop everything of seq from position n on."""
        L.llama_memory_seq_rm(self.mem, seq, n, -1)

    def seq_clear(self, seq: int) -> None:
        L.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def seq_copy(self, src: int, dst: int, n: int) -> None:
        """Tier 1: dst gets src's first n positions (shares the cells; no compute)."""
        L.llama_memory_seq_rm(self.mem, dst, -1, -1)
        L.llama_memory_seq_cp(self.mem, src, dst, 0, n)

    def state_get(self, seq: int) -> bytes:
        """Tier 2/3: the KV bytes of seq."""
        size = L.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = L.llama_state_seq_get_data(self.ctx, buf, size, seq)
        return bytes(memoryview(buf)[:n])

    def state_set(self, seq: int, data: bytes) -> bool:
        L.llama_memory_seq_rm(self.mem, seq, -1, -1)
        buf = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))  # no copy: llama.cpp only reads
        return L.llama_state_seq_set_data(self.ctx, buf, len(data), seq) == len(data)

    # ---- embeddings --------------------------------------------------------------------------
    def _causal(self) -> bool:
        """Whether the model attends only backwards (GGUF `<arch>.attention.causal`, true unless an
        encoder says otherwise)."""
        def meta(key: str) -> str:
            buf = ctypes.create_string_buffer(128)
            n = L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
            return buf.value.decode("utf-8", "replace") if n >= 0 else ""
        if L.llama_model_has_encoder(self.model):
            return False
        return meta(f"{meta('general.architecture')}.attention.causal").lower() not in ("false", "0")

    def embed_part(self, tokens: list[int], start: int, n: int = 0) -> np.ndarray:
        """The sum of the token states of tokens[start:start + n] (n: at most embed_chunk, 0 = that;
        the part before start already in the embeddings context: start = 0 begins an input).
        Pool with embed_finish."""
        if self.embed_ctx is None:
            raise LlamaError("this model is not configured for embeddings")
        if start == 0:
            L.llama_memory_clear(L.llama_get_memory(self.embed_ctx), True)
        b, part = self._ebatch, tokens[start:start + min(n or self.embed_chunk, self.embed_chunk)]
        for i, tok in enumerate(part):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, start + i, 1, 1
            b.seq_id[i][0] = 0
        b.n_tokens = len(part)
        if L.llama_decode(self.embed_ctx, b) != 0:
            raise LlamaError("llama_decode failed for embeddings")
        p = L.llama_get_embeddings(self.embed_ctx)
        return np.ctypeslib.as_array(p, shape=(len(part), self.n_embd)).sum(axis=0, dtype=np.float64)

    @staticmethod
    def embed_finish(total: np.ndarray, n_tokens: int) -> list[float]:
        """The unit-length mean of an input's summed token states."""
        v = (total / max(1, n_tokens)).astype(np.float32)
        norm = float(np.linalg.norm(v)) or 1.0
        return (v / norm).tolist()

    def embed_many(self, inputs: list[list[int]]) -> np.ndarray:
        """A non-causal encoder's embeddings of several inputs (each already cut to n_ctx), packed
        embed_seqs at a time into one llama_decode: one pass over the weights for all of them
        (MiniLM float32 here: 1.3x texts a second on ~35-token sentences, 1.8x on ~12;
        bench/embedder_speed.py). Rows of unit length, mean pooling, the same vectors as embed()
        one by one."""
        out = np.zeros((len(inputs), self.n_embd), dtype=np.float32)
        i = 0
        while i < len(inputs):
            group, used = [], 0
            while i < len(inputs) and len(group) < self.embed_seqs and \
                    (not group or used + len(inputs[i]) <= self.embed_pack):
                group.append(i)
                used += len(inputs[i])
                i += 1
            L.llama_memory_clear(L.llama_get_memory(self.embed_ctx), True)
            b, k = self._ebatch, 0
            for seq, j in enumerate(group):
                for pos, tok in enumerate(inputs[j]):
                    b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, pos, 1, 1
                    b.seq_id[k][0] = seq
                    k += 1
            b.n_tokens = k
            if L.llama_decode(self.embed_ctx, b) != 0:
                raise LlamaError("llama_decode failed for embeddings")
            states = np.ctypeslib.as_array(L.llama_get_embeddings(self.embed_ctx), shape=(k, self.n_embd))
            start = 0
            for j in group:
                n = len(inputs[j])
                v = states[start:start + n].mean(axis=0, dtype=np.float64)
                out[j] = v / (np.linalg.norm(v) or 1.0)
                start += n
        return out

    def embed(self, tokens: list[int]) -> list[float]:
        """One input's embedding in one call (tokens past n_ctx are dropped)."""
        tokens = tokens[: self.n_ctx]
        total = np.zeros(self.n_embd, dtype=np.float64)
        for start in range(0, len(tokens), self.embed_chunk):
            total += self.embed_part(tokens, start)
        return self.embed_finish(total, len(tokens))


PENALTY_LAST_N = 256  # generated tokens the penalties look back over


def make_sampler(n_vocab: int, temperature: float, top_p: float, top_k: int, min_p: float, seed: int,
                 logit_bias: dict[int, float] | None = None, presence: float = 0.0, frequency: float = 0.0,
                 repeat: float = 1.0, grammar: str | None = None, vocab=None):
    """A llama.cpp sampler chain for one sequence (free with free_sampler). presence/frequency:
    OpenAI's penalties; repeat: llama.cpp's multiplicative one (1 = off); grammar: GBNF every
    token must keep the output inside (a LazyGrammar around the chain)."""
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    if grammar:
        g = L.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not g:
            L.llama_sampler_free(chain)
            raise LlamaError("the grammar does not parse")
        _fill_chain(chain, n_vocab, temperature, top_p, top_k, min_p, seed, logit_bias, presence, frequency, repeat)
        return LazyGrammar(chain, g, n_vocab, greedy=temperature <= 0)
    return _fill_chain(chain, n_vocab, temperature, top_p, top_k, min_p, seed, logit_bias, presence, frequency,
                       repeat)


def _fill_chain(chain, n_vocab, temperature, top_p, top_k, min_p, seed, logit_bias, presence, frequency, repeat):
    if presence or frequency or repeat != 1.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, repeat, frequency,
                                                                          presence))
    if logit_bias:
        arr = (L.llama_logit_bias * len(logit_bias))()
        for i, (tok, bias) in enumerate(logit_bias.items()):
            arr[i].token, arr[i].bias = tok, bias
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(n_vocab, len(logit_bias), arr))
    if temperature <= 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        return chain
    if top_k > 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(top_k))
    if top_p < 1.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(top_p, 1))
    if min_p > 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(min_p, 1))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(temperature))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class LazyGrammar:
    """A sampler chain and a grammar applied lazily, as llama.cpp's common sampler does: the chain
    picks from the raw logits, and only when the grammar rejects that token are the candidates
    filtered by the grammar and the chain applied again. Checking one token instead of the whole
    vocabulary each step is what keeps constrained decoding near unconstrained speed.

    Greedy chains choose again without filtering the whole vocabulary: the best candidates (by
    the logits the chain left, penalties and biases applied) go to the grammar in growing chunks,
    and the best one it allows is the answer, exactly the argmax of the filtered vocabulary. A
    sampling chain filters everything and samples again (its distribution needs every token)."""
    CHUNKS = (64, 1024)  # then the whole vocabulary

    def __init__(self, chain, grammar, n_vocab: int, greedy: bool = False):
        self.chain, self.grammar, self.n, self.greedy = chain, grammar, n_vocab, greedy
        k = max(self.CHUNKS)
        self.part = (L.llama_token_data * k)()
        self.part_view = np.frombuffer(self.part, dtype=_TOKEN_DATA)
        self.arr_part = L.llama_token_data_array(ctypes.cast(self.part, ctypes.POINTER(L.llama_token_data)), k, -1,
                                                 False)
        self.buf = (L.llama_token_data * n_vocab)()
        self.view = np.frombuffer(self.buf, dtype=_TOKEN_DATA)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.one = (L.llama_token_data * 1)()
        ptr = ctypes.POINTER(L.llama_token_data)
        self.arr = L.llama_token_data_array(ctypes.cast(self.buf, ptr), n_vocab, -1, False)
        self.arr1 = L.llama_token_data_array(ctypes.cast(self.one, ptr), 1, -1, False)

    def _candidates(self, logits) -> None:
        v = self.view
        v["id"], v["logit"], v["p"] = self.ids, logits, 0.0
        self.arr.size, self.arr.selected, self.arr.sorted = self.n, -1, False

    def sample(self, ctx, index: int) -> int:
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, index), shape=(self.n,))
        self._candidates(logits)
        L.llama_sampler_apply(self.chain, ctypes.byref(self.arr))
        tok = self.buf[self.arr.selected].id
        self.one[0].id, self.one[0].logit, self.one[0].p = tok, 1.0, 0.0
        self.arr1.size, self.arr1.selected, self.arr1.sorted = 1, -1, False
        L.llama_sampler_apply(self.grammar, ctypes.byref(self.arr1))
        if not math.isfinite(self.one[0].logit):  # rejected: choose again among what the grammar allows
            best = self._best_allowed() if self.greedy else None
            if best is None:
                self._candidates(logits)
                L.llama_sampler_apply(self.grammar, ctypes.byref(self.arr))
                L.llama_sampler_apply(self.chain, ctypes.byref(self.arr))
                best = self.buf[self.arr.selected].id
            tok = best
        L.llama_sampler_accept(self.grammar, tok)
        L.llama_sampler_accept(self.chain, tok)
        return tok

    def _best_allowed(self):
        """Greedy: the highest-logit token the grammar allows, searched among the chain's best
        candidates in chunks of growing size (None: none of them is allowed; filter the vocabulary)."""
        logits = self.view["logit"]  # as the chain left them (penalties, biases)
        k = min(self.CHUNKS[-1], self.n - 1)
        idx = np.argpartition(-logits, k)[:k]
        idx = idx[np.argsort(-logits[idx], kind="stable")]  # best first
        start = 0
        for end in (*self.CHUNKS[:-1], k):
            end = min(end, k)
            m = end - start
            part = self.part_view[:m]
            part["id"], part["logit"], part["p"] = idx[start:end], logits[idx[start:end]], 0.0
            last = float(part["logit"][-1])
            self.arr_part.size, self.arr_part.selected, self.arr_part.sorted = m, -1, False
            L.llama_sampler_apply(self.grammar, ctypes.byref(self.arr_part))
            allowed = part["logit"]
            top = float(allowed.max())
            # (a tie with the chunk's last logit may continue past it: then the filter decides)
            if math.isfinite(top):
                return int(part["id"][allowed == top].min()) if top > last else None
            start = end
        return None

    def free(self) -> None:
        L.llama_sampler_free(self.grammar)
        L.llama_sampler_free(self.chain)


def grammar_parses(vocab, grammar: str) -> bool:
    g = L.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not g:
        return False
    L.llama_sampler_free(g)
    return True


def free_sampler(chain) -> None:
    if chain.__class__ is LazyGrammar:
        chain.free()
    else:
        L.llama_sampler_free(chain)


def model_fingerprint(path: str) -> str:
    """Identifies the exact weights: size plus hashes of the head and the tail of the file
    (a full hash of a multi-GB model would delay every start)."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


_last_level = [0]


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet_log(level, text, user_data):
    """llama.cpp logs a great deal at load time; keep errors only (CONT continues the last line)."""
    if level != 5:  # GGML_LOG_LEVEL_CONT
        _last_level[0] = level
    if _last_level[0] == 4 and text:  # GGML_LOG_LEVEL_ERROR
        os.write(2, text)
