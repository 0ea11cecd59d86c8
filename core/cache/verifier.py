"""The semantic cache's second stage: reject near neighbours whose meaning can differ although
their words match.

An embedding that averages word vectors scores "flights from New York to Florida" and "flights
from Florida to New York" as the same question. After the cosine threshold, a candidate must
also pass every check below (each is cheap: the texts are one user message each):

* numbers, dates and quantities: the same digit groups ("3x4" is not "3/4");
* negation: the same count of negators (not, no, never, n't, without…);
* named entities: the same capitalised non-function words, in the same order;
* opposites: a substitution of one word by its opposite (before/after, buy/sell, allow/deny,
  adults/children, safe/dangerous, create/delete…);
* substitution: one content word traded for another that is not a form of it ("bleach and
  ammonia" / "bleach and water"): the thing asked about changed;
* word order: align the token sequences (longest common subsequence). The unaligned tokens
  must either be substitutions in one place (a synonym, a rephrasing: no word moved), or one
  clause of three or more tokens moved as a block. Anything else — two words or phrases trading
  places ("Hubert warns Robert" / "Robert warns Hubert"), a word moved across others — is a
  possible change of roles and is rejected. The common subsequence must also cover
  `min_overlap` of the longer text.

Measured on PAWS-Wiki dev (8,000 word-swap pairs; bench/semantic_eval.py) with WordLlama at
cosine 0.90: precision 0.961 at recall 0.207, where the cosine alone gives precision 0.44.
"""
from __future__ import annotations

import re

NEGATORS = frozenset("not no never none nobody nothing neither nor without cannot nowhere".split())
FUNCTION_WORDS = frozenset("""a an the in on at after before from to of and but or he she it they we you i this that
these those there his her its their our your during when while with for by as since until although however then
thus also both following later between among into onto over under about around near what which who whom whose
where why how is are was were do does did can could will would should may might must""".split())
# words whose swap for each other reverses a request; a substitution between them is rejected
_ANTONYMS = [tuple(p.split("/")) for p in """before/after buy/sell good/bad open/closed open/close above/below
more/less max/min maximum/minimum yes/no true/false start/stop enable/disable add/remove import/export
upload/download win/lose won/lost north/south east/west left/right up/down in/out on/off hot/cold high/low
first/last early/late fast/slow big/small cheap/expensive increase/decrease increase/reduce inside/outside
include/exclude accept/reject allow/deny allow/block lock/unlock encrypt/decrypt push/pull send/receive
import/export best/worst older/younger old/new longer/shorter higher/lower larger/smaller over/under
adult/child adults/children adult/children adults/child safe/dangerous safe/unsafe safe/harmful create/delete
add/delete create/remove legal/illegal always/never all/none positive/negative male/female men/women man/woman
boy/girl boys/girls day/night morning/evening success/failure pass/fail love/hate like/dislike""".split()]
ANTONYMS = frozenset(_ANTONYMS) | frozenset((b, a) for a, b in _ANTONYMS)
_CONTRACTIONS = [(re.compile(p, re.I), r) for p, r in (
    (r"\bcan't\b", "can not"), (r"\bwon't\b", "will not"), (r"n't\b", " not"), (r"'re\b", " are"),
    (r"'m\b", " am"), (r"'ve\b", " have"), (r"'ll\b", " will"), (r"'d\b", " would"),
    (r"\b(what|where|who|how|that|there|it|he|she)'s\b", r"\1 is"))]
_WORD = re.compile(r"[A-Za-z0-9]+")
_NUMBER = re.compile(r"\d+(?:[.,:/x-]\d+)*")
_CAPWORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _normal(text: str) -> str:
    for pat, rep in _CONTRACTIONS:
        text = pat.sub(rep, text)
    return text


def _tokens(text: str) -> list[str]:
    return [t.lower() for t in _WORD.findall(text)]


def _entities(text: str) -> list[str]:
    words = _CAPWORD.findall(text)
    return [w for i, w in enumerate(words) if i > 0 and w[0].isupper() and w.lower() not in FUNCTION_WORDS]


def _align(a: list[str], b: list[str]) -> tuple[int, list[bool], list[bool]]:
    """Longest common subsequence length and which tokens of a and b it uses."""
    n, m = len(a), len(b)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        row, nxt = table[i], table[i + 1]
        for j in range(m - 1, -1, -1):
            row[j] = nxt[j + 1] + 1 if a[i] == b[j] else max(nxt[j], row[j + 1])
    i = j = 0
    in_a, in_b = [False] * n, [False] * m
    while i < n and j < m:
        if a[i] == b[j]:
            in_a[i] = in_b[j] = True
            i += 1
            j += 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return table[0][0], in_a, in_b


def _gaps(used: list[bool]) -> int:
    """Number of separate runs of unaligned tokens."""
    runs, prev = 0, True
    for u in used:
        if not u and prev:
            runs += 1
        prev = u
    return runs


def _content_swap(a: str, b: str) -> bool:
    """One content word traded for another that is not a form of it ("ammonia" / "water"): the
    thing asked about changed. Function-word swaps ("do" / "can") and forms of one word
    ("deliver" / "delivery") are rephrasings."""
    if a in FUNCTION_WORDS or b in FUNCTION_WORDS or a.isdigit() or b.isdigit():
        return False
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n < 4


def conflicts(query: str, candidate: str, traded: bool = False) -> str:
    """The hard conflict between two texts, "" when none: different numbers, a different count
    of negators, different named entities, one word traded for its opposite, or the one word
    that differs traded for another content word (the learned decision's vetoes).

    traded: numbers and entities conflict only when each text has one the other lacks ("Paris"
    for "Rome", 3 for 4), case aside; one only added or dropped ("in 2003", a source named) is
    left to the learned decision, which sees how many (the MiniLM model is trained so: a news
    rephrasing often names one more thing, and the strict rule refused 70% of MRPC's)."""
    q, c = _normal(query), _normal(candidate)
    nq, nc = _NUMBER.findall(q), _NUMBER.findall(c)
    if (set(nq) - set(nc) and set(nc) - set(nq)) if traded else sorted(nq) != sorted(nc):
        return "numbers"
    tq, tc = _tokens(q), _tokens(c)
    if sum(t in NEGATORS for t in tq) != sum(t in NEGATORS for t in tc):
        return "negation"
    if traded:
        eq, ec = {e.lower() for e in _entities(q)}, {e.lower() for e in _entities(c)}
        if (eq - ec - set(tc)) and (ec - eq - set(tq)):
            return "entities"
    elif sorted(_entities(q)) != sorted(_entities(c)):
        return "entities"
    only_q, only_c = set(tq) - set(tc), set(tc) - set(tq)
    if any((x, y) in ANTONYMS for x in only_q for y in only_c):
        return "antonym"
    if len(only_q) == 1 and len(only_c) == 1 and _content_swap(next(iter(only_q)), next(iter(only_c))):
        return "substitution"
    return ""


def differences(query: str, candidate: str) -> tuple[int, int]:
    """How many numbers and named entities one text has that the other lacks (case aside)."""
    q, c = _normal(query), _normal(candidate)
    nq, nc = set(_NUMBER.findall(q)), set(_NUMBER.findall(c))
    eq, ec = {e.lower() for e in _entities(q)}, {e.lower() for e in _entities(c)}
    return len(nq ^ nc), len(eq ^ ec)


def verify(query: str, candidate: str, min_overlap: float = 0.8, max_tokens: int = 256) -> tuple[bool, str]:
    """(True, "") if candidate may be served for query, else (False, the reason): the hard
    conflicts, then entities in the same order and a word alignment that moves nothing."""
    reason = conflicts(query, candidate)
    if reason:
        return False, reason
    q, c = _normal(query), _normal(candidate)
    if _entities(q) != _entities(c):  # (the same ones, in another order: possibly new roles)
        return False, "entities"
    tq, tc = _tokens(q), _tokens(c)
    if tq == tc:
        return True, ""
    if max(len(tq), len(tc)) > max_tokens:  # alignment is quadratic: long texts only match exactly
        return False, "too_long"
    common, used_q, used_c = _align(tq, tc)
    # a moved clause can be aligned in more than one way: take the tidier of both directions
    _, rq, rc = _align(tq[::-1], tc[::-1])
    if _gaps(rq[::-1]) + _gaps(rc[::-1]) < _gaps(used_q) + _gaps(used_c):
        used_q, used_c = rq[::-1], rc[::-1]
    if common < min_overlap * max(len(tq), len(tc)):
        return False, "overlap"
    left_q = [t for t, u in zip(tq, used_q) if not u]
    left_c = [t for t, u in zip(tc, used_c) if not u]
    moved = set(left_q) & set(left_c)
    if any((x, y) in ANTONYMS for x in left_q for y in left_c):
        return False, "antonym"
    if len(left_q) == 1 and len(left_c) == 1 and _content_swap(left_q[0], left_c[0]):
        return False, "substitution"
    if _gaps(used_q) > 1 or _gaps(used_c) > 1:
        return False, "order"
    if moved and len(left_q) < 3:  # a word or two moved: possibly swapped roles
        return False, "order"
    return True, ""
