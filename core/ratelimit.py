"""Exact per-identity rate limits: every bucket lives at its ring owner, and only there.

A request's buckets (its API key's and its tenant's) belong to the ring owner of its tenant:
one owner per request means at most one hop, and none when the request landed on that owner.
Buckets a worker owns are checked in place; the others go to their owner over the mesh,
batched per event-loop turn, and the owner answers from its Cython BucketTable. Because a
bucket has exactly one owner, N workers together admit exactly what the limit allows (peers that
count locally and reconcile later drift). If one bucket admits and another refuses, the admitted
token is given back, so a refusal costs nothing.

When an owner does not answer in `owner_timeout` (it died and is being respawned), the check
fails open by default: the limit is protection, and refusing all traffic of a tenant for the
second a worker takes to come back hurts more than a short overshoot. `fail_open = false`
answers 503 instead.
"""
from __future__ import annotations

import asyncio
import math

from tidegate.core.http11 import HttpError, Response
from tidegate.core.mesh import OwnerUnavailable
from tidegate.core.ring import HashRing, hash64
from tidegate.ext.tokenbucket import BucketTable

TAKE, REFUND = "rl.take", "rl.refund"


class RateLimiter:
    def __init__(self, cfg: dict, slot: int, ring: HashRing, mesh=None):
        rl = cfg["ratelimit"]
        self.cfg, self.slot, self.ring, self.mesh = rl, slot, ring, mesh
        self.table = BucketTable(rl["table_capacity"], rl["idle_ttl"])
        self.limits = []  # (scope, rate, burst) for the scopes that are limited
        for scope in ("key", "tenant", "user"):
            rate = rl[f"{scope}_rps"]
            if rate > 0:
                self.limits.append((scope, rate, rl[f"{scope}_burst"] or max(1.0, rate)))
        self.token_limits = []  # (scope, tokens per second, bucket size) for LLM tokens/minute
        for scope in ("key", "tenant", "user"):
            tpm = rl[f"{scope}_tpm"]
            if tpm > 0:
                self.token_limits.append((scope, tpm / 60.0, tpm))
        self.stats = {"admitted": 0, "limited": 0, "owner_unavailable": 0}
        self._plans: dict = {}  # (tenant, key, user) -> (owner, [[bucket hash, n, capacity, rate], ...])

    @property
    def enabled(self) -> bool:
        return bool(self.limits)

    def handlers(self) -> dict:
        return {TAKE: self._take_local, REFUND: self._refund_local}

    def _take_local(self, checks: list) -> list:
        return self.table.take_list(checks)

    def _refund_local(self, refunds: list) -> None:
        for h, n in refunds:
            self.table.refund(h, n)

    def _checks(self, ident) -> tuple[int, list]:
        """(owner slot, [[bucket hash, n, capacity, rate], ...]) for this identity: a fixed plan per
        identity, computed once (hashing is the dearest part of a local check)."""
        key = (ident.tenant, ident.key_id, ident.user)  # a tuple hashes faster than the dataclass
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 100000:
                self._plans.clear()
            owner = self.ring.owner(f"tenant:{ident.tenant}".encode())
            checks = []
            for scope, rate, burst in self.limits:
                if scope == "user" and not ident.user:
                    continue  # API-key callers have no user
                who = {"key": ident.key_id, "tenant": ident.tenant, "user": f"{ident.tenant}/{ident.user}"}[scope]
                checks.append([hash64(f"{scope}:{who}".encode()), 1.0, burst, rate])
            plan = self._plans[key] = (owner, checks)
        return plan

    def check(self, ident, then, req):
        """Admit or refuse ident's request, then answer with then(req): at once when the buckets
        are local, else as a future resolved from the owner's reply (callbacks, no Task)."""
        owner, checks = self._checks(ident)
        if not checks:
            return then(req)
        if owner == self.slot:  # the buckets are ours: no message at all
            self._decide(owner, checks, self.table.take_list(checks))
            return then(req)
        out = self.mesh.loop.create_future()
        self.mesh.request_cb(owner, TAKE, checks, self.cfg["owner_timeout"],
                             lambda ok, result: self._on_reply(ok, result, owner, checks, then, req, out))
        return out

    def _on_reply(self, ok: bool, results, owner: int, checks: list, then, req, out) -> None:
        try:
            if not ok:
                if not isinstance(results, OwnerUnavailable):
                    raise results
                self.stats["owner_unavailable"] += 1
                if not self.cfg["fail_open"]:
                    raise HttpError(503, "rate-limit owner unavailable; retry shortly", "owner_unavailable",
                                    headers=[(b"retry-after", b"1")]) from None
                results = [0.0] * len(checks)  # fail open: admit
            self._decide(owner, checks, results)
            resp = then(req)
        except BaseException as e:
            out.set_exception(e)
            return
        if resp.__class__ is Response or not asyncio.iscoroutine(resp):
            out.set_result(resp)
        else:  # an async handler: chain its outcome into out
            asyncio.ensure_future(resp).add_done_callback(lambda done: _chain(done, out))

    # ---- LLM tokens/minute: reserve up front, settle when the real usage is known --------------
    def reserve(self, ident, tokens: float):
        """Reserve `tokens` (prompt + max_tokens) from ident's tokens/minute buckets. Returns a
        Reservation at once when the buckets are local, else a future of one; raises (or the
        future fails with) 429 when a bucket cannot cover it. Reserving first means concurrent
        requests cannot together overshoot the limit."""
        owner = self.ring.owner(f"tenant:{ident.tenant}".encode())
        who = {"key": ident.key_id, "tenant": ident.tenant, "user": f"{ident.tenant}/{ident.user}"}
        checks = [[hash64(f"tpm-{scope}:{who[scope]}".encode()), float(tokens), burst, rate]
                  for scope, rate, burst in self.token_limits if scope != "user" or ident.user]
        reservation = Reservation(owner, checks)
        if not checks:
            return reservation
        if owner == self.slot or self.mesh is None:
            self._decide(owner, checks, self.table.take_list(checks))
            return reservation
        out = self.mesh.loop.create_future()
        self.mesh.request_cb(owner, TAKE, checks, self.cfg["owner_timeout"],
                             lambda ok, result: self._on_reply(ok, result, owner, checks, lambda _: reservation,
                                                               None, out))
        return out

    def settle(self, reservation: "Reservation", used: float) -> None:
        """Give back what was reserved but not used."""
        unused = [[c[0], c[1] - used] for c in reservation.checks if c[1] > used]
        if not unused:
            return
        if reservation.owner == self.slot or self.mesh is None:
            self._refund_local(unused)
        else:
            self.mesh.request_cb(reservation.owner, REFUND, unused, self.cfg["owner_timeout"], _ignore)

    def _decide(self, owner: int, checks: list, results: list) -> None:
        """Admit (return) or refuse (raise 429) given the owner's answers to checks."""
        if min(results) >= 0:
            self.stats["admitted"] += 1
            return
        self.stats["limited"] += 1
        refunds = [[c[0], c[1]] for c, r in zip(checks, results) if r >= 0]
        if refunds:  # give back what the other buckets granted
            if owner == self.slot or self.mesh is None:
                self._refund_local(refunds)
            else:
                self.mesh.request_cb(owner, REFUND, refunds, self.cfg["owner_timeout"], _ignore)
        check, r = min(((c, r) for c, r in zip(checks, results) if r < 0), key=lambda cr: cr[0][2])
        cap, rate = check[2], check[3]  # the tightest refusing bucket speaks for the answer
        retry = "3600" if r == -math.inf else str(max(1, math.ceil(-r)))
        reset = str(max(1, math.ceil(cap / rate)))
        raise HttpError(429, "rate limit exceeded; retry after the time in Retry-After", "rate_limit_exceeded",
                        headers=[(b"retry-after", retry.encode()), (b"ratelimit-limit", b"%d" % cap),
                                 (b"ratelimit-remaining", b"0"), (b"ratelimit-reset", reset.encode())])


class Reservation:
    __slots__ = ("owner", "checks")

    def __init__(self, owner: int, checks: list):
        self.owner, self.checks = owner, checks


def _chain(done, out) -> None:
    if done.exception() is not None:
        out.set_exception(done.exception())
    else:
        out.set_result(done.result())


def _ignore(ok, result) -> None:
    """A lost refund only leaves a bucket a little short until it refills."""
