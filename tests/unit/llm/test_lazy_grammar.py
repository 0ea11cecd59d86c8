"""Constrained greedy decoding chooses, after a rejection, from the best candidates in chunks
instead of filtering the whole vocabulary: the tokens must be exactly those of the full filter."""
import json

from tidegate.core.llm import engine as E
from tidegate.core.llm.structured import grammar_for

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}}}


def _run(eng, prompt, grammar, chunked: bool, **kw):
    s = E.make_sampler(eng.n_vocab, 0.0, 1.0, 0, 0.0, 1, grammar=grammar, vocab=eng.vocab, **kw)
    if not chunked:
        s.greedy = False  # always filter the whole vocabulary after a rejection
    toks = eng.tokenize(prompt)
    eng.seq_clear(0)
    eng.decode([(t, i, 0, i == len(toks) - 1) for i, t in enumerate(toks)])
    out, pos = [], len(toks)
    for _ in range(60):
        tok = eng.sample(s, 0 if out else len(toks) - 1)
        if eng.is_eog(tok):
            break
        out.append(tok)
        eng.decode([(tok, pos, 0, True)])
        pos += 1
    E.free_sampler(s)
    return out


def test_chunked_greedy_choice_equals_the_full_filter(demo_model, monkeypatch):
    eng = E.Engine(demo_model, 512, 1, 512, 0, 0, False)
    chosen = []  # what the chunked search returned (None: it fell back to the full filter)
    best = E.LazyGrammar._best_allowed
    monkeypatch.setattr(E.LazyGrammar, "_best_allowed", lambda self: chosen.append(best(self)) or chosen[-1])
    g = grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    for prompt, kw in (("A person:", {}), ("Tags please", {"frequency": 1.5}),
                       ("Colours", {"logit_bias": {13: 5.0, 29908: -3.0}})):
        fast, full = _run(eng, prompt, g, True, **kw), _run(eng, prompt, g, False, **kw)
        assert fast == full, (prompt, kw)
        assert len(fast) > 5
    assert any(c is not None for c in chosen)  # the chunked search really chose tokens
    text = b"".join(eng.piece(t) for t in _run(eng, "A person:", g, True)).decode()
    json.loads(text)  # (when it ended: the grammar closed the object)
