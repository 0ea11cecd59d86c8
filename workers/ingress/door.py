"""Shedding before a large body is read (the HTTP connection asks once the request head is in).

A request whose Content-Length is at least `overload.early_bytes` and whose answer would be a
refusal anyway is refused at once and its connection closed, instead of reading megabytes only to
turn them away. That is the case for a class whose policy is `reject` (or any class but critical
under box-level shedding, for a `never` one) while its downstream sheds it. A `cached` class is
let through: its cached answer is keyed by the body. So is a caller the head alone cannot name
(a session token needs its owner; a bad key gets its 401 after the body, like every other).
"""
from __future__ import annotations

from tidegate.core.state.auth import ANONYMOUS, presented_token
from tidegate.core.state.sessions import PREFIX

LLM_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class EarlyShed:
    def __init__(self, keys, classes, shedder, llm_models: list[dict], predictors: dict):
        self.keys, self.classes, self.shedder = keys, classes, shedder
        one = llm_models[0] if len(llm_models) == 1 else None  # else the model is in the body
        self.llm = (one.get("class") if one else None, f"inference:{one['name']}" if one else None,
                    f"model {one['name']!r}" if one else "the model")
        self.predictors = predictors

    def _target(self, path: str):
        """(declared class, downstream, what) for a route that sheds, else None."""
        if path in LLM_ROUTES:
            return self.llm
        if path.startswith("/v1/predict/"):
            p = self.predictors.get(path[len("/v1/predict/"):].removesuffix("/batch"))
            return (p.cls, p.source, f"model {p.name!r}") if p is not None else None
        return None

    def __call__(self, url: bytes, headers: dict):
        path = url.partition(b"?")[0].decode("latin-1")
        target = self._target(path)
        if target is None:
            return None
        token = presented_token(headers)
        if token.startswith(PREFIX):
            return None
        ident = self.keys.authenticate(token) if self.keys.enabled else ANONYMOUS
        if ident is None:
            return None
        declared, source, what = target
        cls = self.classes.of(path, ident.klass, declared)
        sh = self.shedder
        if sh.cached(cls):
            return None
        retry = sh.check(cls, source)
        return sh.reject(cls, retry, what) if retry is not None else None
