"""API-key authentication: keys are known only by their SHA-256, never stored or logged in clear.

A request presents `Authorization: Bearer KEY` (or `x-api-key: KEY`); the gateway hashes what it
got and looks the digest up (keys that matched are remembered in memory, so a client's next
request skips the hash). Unknown, missing and malformed credentials all get the same 401 after
the same work (one hash, one dict lookup), so an answer says nothing about why.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Identity:
    key_id: str       # first 12 hex digits of the key's hash: safe to log and to key buckets
    name: str
    tenant: str
    klass: str
    user: str = ""    # set for session callers
    session: str = ""  # the session's id (SHA-256 of its token)
    record: dict | None = field(default=None, compare=False, hash=False, repr=False)  # the session as fetched


def hash_key(key: str | bytes) -> str:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


ANONYMOUS = Identity("anonymous", "anonymous", "anonymous", "")  # no API keys configured; class: classes.default


def presented_token(headers: dict) -> bytes:
    """The credential a request presents: `Authorization: Bearer X` or `x-api-key: X`."""
    raw = headers.get(b"authorization")
    if raw is not None:
        scheme, _, token = raw.partition(b" ")
        return token.strip() if scheme.lower() == b"bearer" else b""
    return headers.get(b"x-api-key", b"")


class ApiKeys:
    CACHE_MAX = 10000

    def __init__(self, entries: list[dict], classes: dict | None = None):
        """classes: the [classes] section: a key that names no class takes its tenant's, else the default."""
        classes = classes or {"tenants": {}, "default": "standard"}
        self._known: dict[bytes, Identity] = {}  # presented key -> identity, for keys that matched
        self.by_hash = {e["key_sha256"]: Identity(e["key_sha256"][:12], e.get("name", e["key_sha256"][:12]), e["tenant"],
                                                  e.get("class") or classes["tenants"].get(e["tenant"])
                                                  or classes["default"]) for e in entries}
        self.key_ids = {i.key_id for i in self.by_hash.values()}  # sessions opened by a removed key stop working

    @property
    def enabled(self) -> bool:
        return bool(self.by_hash)

    def authenticate(self, token: bytes) -> Identity | None:
        """The identity of an API key, or None (the guard answers 401)."""
        ident = self._known.get(token)
        if ident is not None:
            return ident
        ident = self.by_hash.get(hash_key(token)) if token else None
        if ident is None:
            return None
        if len(self._known) >= self.CACHE_MAX:
            self._known.clear()
        self._known[token] = ident  # only keys that matched: a flood of bad keys cannot fill it
        return ident
