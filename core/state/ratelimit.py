"""Exact per-identity rate limits: every bucket lives at its ring owner, and only there.

A request's buckets (its API key's and its tenant's) belong to the ring owner of its tenant:
one owner per request means at most one hop, and none when the request landed on that owner.
Buckets a worker owns are checked in place; the others go to their owner over the mesh,
batched per event-loop turn, and the owner answers from its Cython BucketTable. Because a
bucket has exactly one owner, N workers together admit exactly what the limit allows (peers that
count locally and reconcile later drift). If one bucket admits and another refuses, the admitted
token is given back, so a refusal costs nothing.

Leases take the hop off the hot path without giving up exactness: when a plan (tenant, key,
user) is busy on a worker that does not own it, the owner grants that worker a few extra tokens
with its answer, taken from the buckets like any others, so the worker admits the next requests
of that plan in place. A lease is at most `lease_max` tokens and at most 1/(2N) of what the
bucket holds, so leases dry up as a bucket empties and the last tokens are decided at the owner
one by one; tokens not used within `lease_ttl` go back. Every admission still spends a token
the owner took, so N workers together never admit more than the limit.

When an owner does not answer in `owner_timeout` and has not been heard from for longer than that
(it died and is being respawned), the check fails open by default: the limit is protection, and refusing all traffic of a tenant for the
second a worker takes to come back hurts more than a short overshoot. An owner that is alive but
slow is not down: its time-outs answer 503, as does every time-out with `fail_open = false`.

The limiter only decides: `admit` and `reserve` return None (admitted) or a Refusal, or a
Future of one when the owner is a hop away. Turning a Refusal into a 429 or 503 is the ingress
guard's job (workers/ingress/guard.py); every owner call goes through core/state/owners.py.
"""
from __future__ import annotations

import asyncio
import math
from collections import OrderedDict

from tidegate.core.messaging.mesh import OwnerUnavailable
from tidegate.core.messaging.protocol import RL_LEASE, RL_REFUND, RL_TAKE
from tidegate.core.state.ring import hash64
from tidegate.ext.tokenbucket import BucketTable


class Refusal:
    """Why a request is not admitted: a bucket is empty (429, with the headers' figures) or the
    owner is unreachable and the limiter fails closed (503)."""
    __slots__ = ("status", "retry_after", "limit", "reset")

    def __init__(self, status: int, retry_after: int, limit: float = 0.0, reset: int = 0):
        self.status, self.retry_after, self.limit, self.reset = status, retry_after, limit, reset


UNAVAILABLE = Refusal(503, 1)


class RateLimiter:
    def __init__(self, cfg: dict, owners):
        rl = cfg["ratelimit"]
        self.cfg, self.owners = rl, owners
        # one table per tenant at its owner, each a bounded share of table_capacity: a tenant that
        # fills its share is the one refused (one table for all had refused every other tenant's
        # new identities, Retry-After 3600, once one tenant minted users to fill it)
        self.share = max(64, int(rl["table_capacity"] * rl["tenant_share"]))
        self.tables: OrderedDict[str, BucketTable] = OrderedDict()
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
        self.stats = {"admitted": 0, "limited": 0, "leased": 0}
        self._plans: dict = {}  # (tenant, key, user) -> (owner, [[bucket hash, n, capacity, rate], ...])
        # plan key -> Lease, for plans owned elsewhere: tokens granted by the owner, not yet spent
        self._leases: dict = {}
        self.lease_max, self.lease_ttl = rl["lease_max"], rl["lease_ttl"]
        self.n_slots = owners.peers
        owners.register({RL_TAKE: self._take_local, RL_LEASE: self._lease_local, RL_REFUND: self._refund_local})

    def counters(self) -> dict:
        st = self.stats
        return {"ratelimit_admitted": st["admitted"], "ratelimit_limited": st["limited"],
                "ratelimit_leased": st["leased"], "ratelimit_buckets": sum(len(t) for t in self.tables.values())}

    # ---- at the owner -------------------------------------------------------------------------
    def table_of(self, tenant: str) -> BucketTable:
        """The tenant's table (made as first needed; past max_tenant_tables the least recently
        used empty one goes, else the least recently used)."""
        t = self.tables.get(tenant)
        if t is None:
            if len(self.tables) >= self.cfg["max_tenant_tables"]:
                quiet = next((k for k, v in self.tables.items() if not len(v)), next(iter(self.tables)))
                del self.tables[quiet]
            t = self.tables[tenant] = BucketTable(self.share, self.cfg["idle_ttl"])
        else:
            self.tables.move_to_end(tenant)
        return t

    def forget_plans(self) -> None:
        """Memory pressure: the asker's plans are rebuilt as identities come back."""
        self._plans.clear()

    def reclaim(self) -> None:
        """Periodic: drop refilled idle buckets in every table."""
        for t in self.tables.values():
            t.reclaim()

    def _take_local(self, checks: list) -> list:
        return self.table_of(_tenant(checks)).take_list(checks)

    @property
    def enabled(self) -> bool:
        return bool(self.limits)

    def _lease_local(self, msg: list) -> list:
        """Owner side of a check that may carry a lease: [checks, want] -> [results, granted].
        The extra tokens come out of the same buckets, capped at 1/(2N) of what is left."""
        checks, want = msg
        table = self.table_of(_tenant(checks))
        results = table.take_list(checks)
        left = min(results)
        granted = min(want, int(left / (2 * self.n_slots))) if left > 0 else 0
        if granted > 0:
            for c in checks:
                table.take(c[0], granted, c[2], c[3])
        return [results, granted]

    def _refund_local(self, refunds: list) -> None:
        table = self.table_of(_tenant(refunds, 2))
        for r in refunds:
            table.refund(r[0], r[1])

    # ---- asking -------------------------------------------------------------------------------
    def _checks(self, ident) -> tuple[int, list]:
        """(owner slot, [[bucket hash, n, capacity, rate], ...]) for this identity: a fixed plan per
        identity, computed once (hashing is the dearest part of a local check)."""
        key = (ident.tenant, ident.key_id, ident.user)  # a tuple hashes faster than the dataclass
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 100000:
                self._plans.clear()
            owner = self.owners.owner_of(f"tenant:{ident.tenant}".encode())
            checks = []
            for scope, rate, burst in self.limits:
                if scope == "user" and not ident.user:
                    continue  # API-key callers have no user
                who = {"key": ident.key_id, "tenant": ident.tenant, "user": f"{ident.tenant}/{ident.user}"}[scope]
                checks.append([hash64(f"{scope}:{who}".encode()), 1.0, burst, rate, ident.tenant])
            plan = self._plans[key] = (owner, checks)
        return plan

    def admit(self, ident):
        """None (admitted) or a Refusal, at once when the buckets are local or a leased token is
        left; else a Future of one, resolved from the owner's reply."""
        owner, checks = self._checks(ident)
        if not checks:
            return None
        owners = self.owners
        if owners.is_local(owner):  # the buckets are ours: no message, no lease
            return self._decide(owner, checks, owners.call(owner, RL_TAKE, checks, 0.0))
        want = 0
        if self.lease_max:
            key = (ident.tenant, ident.key_id, ident.user)
            lease = self._leases.get(key)
            if lease is None:
                lease = self._leases[key] = Lease(owner, checks)
            now = owners.loop.time()
            if lease.tokens > 0 and now < lease.expiry:  # spend a leased token: no message
                lease.tokens -= 1
                self.stats["admitted"] += 1
                self.stats["leased"] += 1
                if lease.tokens <= lease.want >> 1 and not lease.asking:
                    self._prefetch(lease)  # renew before it runs dry, so the plan never waits
                return None
            want = lease.next_want(now, self.lease_max, self.lease_ttl)
            if lease.tokens > 0:  # expired leftovers go back before asking again
                self._give_back(lease)
            if want:
                lease.asking = True
        timeout = self.cfg["owner_timeout"]
        if want:
            reply = owners.call(owner, RL_LEASE, [checks, want], timeout)
            return _then(reply, lambda ok, result: self._on_lease(ok, result, lease, owner, checks))
        return _then(owners.call(owner, RL_TAKE, checks, timeout),
                     lambda ok, result: self._on_reply(ok, result, owner, checks))

    def _on_lease(self, ok: bool, result, lease: "Lease", owner: int, checks: list):
        lease.asking = False
        if ok:
            result, granted = result
            if granted:
                lease.tokens += granted
                lease.expiry = self.owners.loop.time() + self.lease_ttl
        return self._on_reply(ok, result, owner, checks)

    def _prefetch(self, lease: "Lease") -> None:
        """Ask for the next lease while this one still has tokens: a check of 0 tokens that
        carries a lease request. Being here means the plan is busy, so the next lease is larger."""
        lease.asking = True
        lease.want = min(self.lease_max, max(1, lease.want * 2))
        reply = self.owners.call(lease.owner, RL_LEASE, [lease.probe, lease.want], self.cfg["owner_timeout"])
        reply.add_done_callback(lambda f: self._on_prefetch(f, lease))

    def _on_prefetch(self, fut, lease: "Lease") -> None:
        lease.asking = False
        if fut.exception() is None and fut.result()[1]:
            lease.tokens += fut.result()[1]
            lease.expiry = self.owners.loop.time() + self.lease_ttl

    def sweep_leases(self) -> None:
        """Give back tokens of leases that ran out of time, and forget plans gone quiet, so a
        lease never keeps tokens from the other workers for more than lease_ttl (plus a sweep)."""
        if not self._leases:
            return
        now = self.owners.loop.time()
        for key, lease in list(self._leases.items()):
            if now < lease.expiry or lease.asking:
                continue
            if lease.tokens > 0:
                self._give_back(lease)
                lease.want //= 2
            elif now > lease.expiry + 10 * self.lease_ttl:
                del self._leases[key]

    def _give_back(self, lease: "Lease") -> None:
        refunds = [[c[0], lease.tokens, c[4]] for c in lease.checks]
        lease.tokens = 0
        self.owners.send(lease.owner, RL_REFUND, refunds, self.cfg["owner_timeout"])

    def _on_reply(self, ok: bool, results, owner: int, checks: list):
        if not ok:
            if not isinstance(results, OwnerUnavailable):
                raise results
            if not self.cfg["fail_open"] or not self.owners.is_down(owner):
                return UNAVAILABLE  # fail open only while the owner is down, never because it is slow
            results = [0.0] * len(checks)  # fail open: admit
        return self._decide(owner, checks, results)

    def admit_more(self, ident, extra: int):
        """`extra` more requests' worth from ident's request buckets (n choices are n requests
        against the limits, the guard took the first): None, a Refusal, or a Future of one."""
        owner, checks = self._checks(ident)
        if not checks or extra <= 0:
            return None
        more = [[c[0], float(extra), c[2], c[3], c[4]] for c in checks]
        reply = self.owners.call(owner, RL_TAKE, more, self.cfg["owner_timeout"])
        if not asyncio.isfuture(reply):
            return self._decide(owner, more, reply)
        return _then(reply, lambda ok, result: self._on_reply(ok, result, owner, more))

    # ---- LLM tokens/minute: reserve up front, settle when the real usage is known --------------
    def reserve(self, ident, tokens: float):
        """Reserve `tokens` (prompt + max_tokens) from ident's tokens/minute buckets: a
        Reservation or a Refusal, or a Future of one when the owner is a hop away. Reserving
        first means concurrent requests cannot together overshoot the limit."""
        owner = self.owners.owner_of(f"tenant:{ident.tenant}".encode())
        who = {"key": ident.key_id, "tenant": ident.tenant, "user": f"{ident.tenant}/{ident.user}"}
        checks = [[hash64(f"tpm-{scope}:{who[scope]}".encode()), float(tokens), burst, rate, ident.tenant]
                  for scope, rate, burst in self.token_limits if scope != "user" or ident.user]
        reservation = Reservation(owner, checks)
        if not checks:
            return reservation
        reply = self.owners.call(owner, RL_TAKE, checks, self.cfg["owner_timeout"])
        if not asyncio.isfuture(reply):
            return self._decide(owner, checks, reply) or reservation
        return _then(reply, lambda ok, result: self._on_reply(ok, result, owner, checks) or reservation)

    def settle(self, reservation: "Reservation", used: float) -> None:
        """Give back what was reserved but not used, and charge what was used beyond it (the
        bucket may go below zero: the next requests wait for the debt to refill)."""
        delta = [[c[0], c[1] - used, c[4]] for c in reservation.checks if c[1] != used]
        if delta:
            self.owners.send(reservation.owner, RL_REFUND, delta, self.cfg["owner_timeout"])

    def _decide(self, owner: int, checks: list, results: list):
        """None (admitted) or the Refusal, given the owner's answers to checks."""
        if min(results) >= 0:
            self.stats["admitted"] += 1
            return None
        self.stats["limited"] += 1
        refunds = [[c[0], c[1], c[4]] for c, r in zip(checks, results) if r >= 0]
        if refunds:  # give back what the other buckets granted
            self.owners.send(owner, RL_REFUND, refunds, self.cfg["owner_timeout"])
        check, r = min(((c, r) for c, r in zip(checks, results) if r < 0), key=lambda cr: cr[0][2])
        cap, rate = check[2], check[3]  # the tightest refusing bucket speaks for the answer
        retry = 3600 if r == -math.inf else max(1, math.ceil(-r))
        return Refusal(429, retry, cap, max(1, math.ceil(cap / rate)))

def _tenant(items: list, at: int = 4) -> str:
    """The tenant a call's checks ([hash, n, capacity, rate, tenant]) or refunds ([hash, n,
    tenant]) are for: one call is one identity's, so one tenant's."""
    return items[0][at] if items and len(items[0]) > at else ""


class Lease:
    """Tokens the owner granted this worker for one plan. The size asked for adapts: it doubles
    while the plan keeps coming back within lease_ttl, and halves when tokens went unused, so a
    quiet plan asks for nothing and costs no refunds."""
    __slots__ = ("owner", "checks", "probe", "tokens", "expiry", "want", "asking", "last_ask")

    def __init__(self, owner: int, checks: list):
        self.owner, self.checks = owner, checks
        self.probe = [[c[0], 0.0, c[2], c[3], c[4]] for c in checks]  # takes nothing: carries prefetches
        self.tokens, self.expiry, self.want, self.asking, self.last_ask = 0, 0.0, 0, False, -1e9

    def next_want(self, now: float, most: int, ttl: float) -> int:
        if self.asking:  # one lease request in flight per plan is enough
            return 0
        if self.tokens > 0:  # the last lease was not used up in time
            self.want //= 2
        elif now - self.last_ask < ttl:  # busy: back for more within ttl
            self.want = min(most, max(1, self.want * 2))
        self.last_ask = now
        return self.want


class Reservation:
    __slots__ = ("owner", "checks")

    def __init__(self, owner: int, checks: list):
        self.owner, self.checks = owner, checks


def _then(fut: asyncio.Future, fn) -> asyncio.Future:
    """A Future of fn(ok, result_or_exception) once fut resolves (callbacks, no Task)."""
    out = fut.get_loop().create_future()

    def done(f):
        err = f.exception()
        try:
            value = fn(err is None, f.result() if err is None else err)
        except BaseException as e:
            out.set_exception(e)
            return
        out.set_result(value)
    fut.add_done_callback(done)
    return out
