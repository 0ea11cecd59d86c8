"""The state plane past one box: the owner-call seam (core/state/owners.py) over a Valkey/Redis
Cluster, so several tidegate nodes share sessions, rate limits and exact-cache entries.

`state.backend = "cluster"` hands RateLimiter, ExactCache and the session guard a ClusterOwners
instead of the local Owners; they call it the same way (owner_of, call, send) and do not know
where the state lives. The cluster is the owner of every key: the "owner" of a key is its hash
tag, so all of one identity's buckets (or one session) live in one slot and one script call
decides them atomically. Event-log partitions stay with the local Owners (an fsynced log per
box); only what must be shared moves.

- Rate limits: the same token buckets as ext/tokenbucket.pyx, as server-side Lua on the server's
  clock. Leases carry over: a node takes a few tokens in the same script call (at most 1/(2P)
  of what is left, P = state.lease_peers) and spends them in place, so most requests need no
  round trip while the last tokens and every refusal are decided in the cluster.
- Sessions: a hash per session with its expiry as the key's TTL (sliding on use). Writes are
  acknowledged only after `WAIT` saw `state.write_replicas` replicas take them, so a master
  killed after the answer loses nothing a client was told succeeded. Patches are
  compare-and-set on a version field.
- Exact cache: one string per entry, expiring past the stale window.

Client: valkey-glide (one multiplexed connection per node, kept current by its Rust core):
measured against redis-py's asyncio cluster client (bench/state_clients.py), it did 1.8x the script calls/s at 64
in flight, and redis-py raised MaxConnectionsError past its pool instead of queueing; with one
connection per node a WAIT covers the write sent before it. Errors (a node down, failover in
progress, a timeout) become OwnerUnavailable: the callers answer 503 or fail open as configured.
"""
from __future__ import annotations

import asyncio
import hashlib
import math
import time

import orjson

from tidegate.core.messaging.mesh import OwnerUnavailable
from tidegate.core.messaging.protocol import (RL_LEASE, RL_REFUND, RL_TAKE, SESS_CREATE, SESS_DELETE, SESS_GET,
                                              SESS_PATCH, XC_GET, XC_PUT, XC_STALE)
from tidegate.core.state.sessions import FULL, TOO_LARGE, merge_attributes, new_record

# ---- server-side scripts (KEYS share one hash tag: one slot, one atomic call) -----------------
# buckets: KEYS = bucket keys; ARGV = want, peers, then n, capacity, rate per key.
# Each bucket as ext/tokenbucket.pyx takes it: the tokens left (>= 0) when granted, else minus the
# seconds until n are there ("-inf": never). A lease (want > 0) takes min(want, left / (2 peers))
# more from every bucket when all granted. Returns the results as strings, then the lease.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local want, peers = tonumber(ARGV[1]), tonumber(ARGV[2])
local out, left, lv = {}, math.huge, {}
for i, key in ipairs(KEYS) do
  local n, cap, rate = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  local b = redis.call('HMGET', key, 'tk', 'ts')
  local tokens, last = tonumber(b[1]), tonumber(b[2])
  if tokens == nil then tokens, last = cap, now end
  if now > last then tokens = math.min(cap, tokens + (now - last) * rate); last = now end
  local r
  if tokens >= n then tokens = tokens - n; r = tokens
  elseif n > cap or rate <= 0 then r = -math.huge
  else r = -((n - tokens) / rate) end
  lv[i] = {key, tokens, last, cap, rate}
  if r < left then left = r end
  out[i] = (r == -math.huge) and '-inf' or string.format('%.17g', r)
end
local granted = 0
if want > 0 and left > 0 then granted = math.min(want, math.floor(left / (2 * peers))) end
for i, b in ipairs(lv) do
  local tokens = b[2] - granted
  redis.call('HSET', b[1], 'tk', string.format('%.17g', tokens), 'ts', string.format('%.17g', b[3]),
             'cp', string.format('%.17g', b[4]))
  local full = (b[5] > 0) and (b[4] - tokens) / b[5] or 0
  redis.call('PEXPIRE', b[1], math.ceil((full + 60) * 1000))
end
out[#KEYS + 1] = tostring(granted)
return out
"""
# refunds: KEYS = bucket keys; ARGV = n per key (negative: a charge). Capped at capacity; a bucket
# gone meanwhile (expired: full) stays gone.
REFUND = """
for i, key in ipairs(KEYS) do
  local b = redis.call('HMGET', key, 'tk', 'cp')
  if b[1] then
    local tokens = math.min(tonumber(b[2]), tonumber(b[1]) + tonumber(ARGV[i]))
    redis.call('HSET', key, 'tk', string.format('%.17g', tokens))
  end
end
return 1
"""
# a session read that slides its expiry: KEYS[1]; ARGV = now, ttl (s). Returns HGETALL or nil.
# The touch is written only once the expiry moved by more than ttl/10 (as the local store
# persists touches): most authenticated requests cost the cluster a read, not a replicated write.
SESSION_TOUCH = """
local cur = redis.call('HGET', KEYS[1], 'expires_at')
if not cur then return nil end
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
if now + ttl - tonumber(cur) > ttl / 10 then
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[1], 'expires_at', string.format('%.17g', now + ttl))
  redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000))
end
return redis.call('HGETALL', KEYS[1])
"""
# a patch as compare-and-set: KEYS[1]; ARGV = version read, attributes JSON, now, ttl.
SESSION_CAS = """
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[1] then return 0 end
local exp = tonumber(ARGV[3]) + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'attributes', ARGV[2], 'v', tostring(tonumber(v) + 1), 'last_seen', ARGV[3],
           'expires_at', string.format('%.17g', exp))
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4]) * 1000))
return 1
"""
FIELDS = ("tenant", "user", "key_id", "class")
NUMBERS = ("created_at", "last_seen", "expires_at")
CAS_TRIES = 8


def key_tag(key: bytes) -> str:
    """A key's hash tag: a digest, so any tenant or token text maps to a well-formed slot key."""
    return hashlib.blake2b(key, digest_size=9).hexdigest()


class ClusterOwners:
    """core/state/owners.py's interface over the cluster: every owner is remote, and an owner is
    the hash tag of its key."""

    def __init__(self, cfg: dict, client=None):
        st = cfg["state"]
        self.st, self.prefix = st, st["prefix"]
        self.peers = st["lease_peers"]
        self.ttl, self.max_attributes = cfg["sessions"]["ttl"], cfg["sessions"]["max_attributes_bytes"]
        xc = cfg["cache"]
        self.xc_ttl, self.xc_stale = xc["exact_ttl"], xc["exact_stale_ttl"]
        self.client = client
        self.stats = {"owner_unavailable": 0, "cluster_calls": 0, "cluster_errors": 0}
        self._failing: dict = {}  # owner (hash tag; None: the connection) -> when its run of errors began
        self._scripts = None
        self._connector = None
        self.last_error = ""
        self.ops = {RL_TAKE: self._take, RL_LEASE: self._lease, RL_REFUND: self._refund,
                    SESS_CREATE: self._sess_create, SESS_GET: self._sess_get, SESS_PATCH: self._sess_patch,
                    SESS_DELETE: self._sess_delete, XC_GET: self._xc_get, XC_STALE: self._xc_stale,
                    XC_PUT: self._xc_put}

    async def start(self, wait: float) -> bool:
        """Connect in the background, retrying until a seed answers; wait at most `wait` seconds
        for the first connection. Until then every call is OwnerUnavailable (503 or fail-open),
        so a worker respawned while the cluster is down still boots and serves the rest."""
        self._connector = asyncio.ensure_future(self._keep_connecting())
        try:
            await asyncio.wait_for(asyncio.shield(self._connector), wait)
        except asyncio.TimeoutError:
            return False
        return True

    async def _keep_connecting(self) -> None:
        while self.client is None:
            try:
                await self.connect()
            except Exception as e:
                self.last_error = repr(e)
                self._failed(None)
                await asyncio.sleep(0.5)

    async def connect(self) -> None:
        """Open the client (after fork: one per process); raises when no seed answers."""
        from glide import (GlideClusterClient, GlideClusterClientConfiguration, Logger, LogLevel, NodeAddress,
                           Script, ServerCredentials)
        Logger.set_logger_config(LogLevel.OFF)  # (its warnings go to stderr; failures reach us as errors)
        st = self.st
        seeds = [NodeAddress(h, int(p)) for h, p in (s.rsplit(":", 1) for s in st["seeds"])]
        creds = ServerCredentials(st["password"], st["username"] or None) if st["password"] else None
        self._scripts = {name: Script(code) for name, code in
                         (("take", TAKE), ("refund", REFUND), ("touch", SESSION_TOUCH), ("cas", SESSION_CAS))}
        self.client = await GlideClusterClient.create(GlideClusterClientConfiguration(
            seeds, use_tls=st["tls"], credentials=creds, request_timeout=int(st["timeout"] * 1000),
            client_name="tidegate"))

    async def close(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
        if self.client is not None:
            await self.client.close()
            self.client = None

    # ---- the owners interface -----------------------------------------------------------------
    def counters(self) -> dict:
        st = self.stats
        return {"owner_unavailable": st["owner_unavailable"], "state_cluster_calls": st["cluster_calls"],
                "state_cluster_errors": st["cluster_errors"]}

    @property
    def shared(self) -> bool:
        return True  # other nodes take leases from the same buckets

    def register(self, handlers: dict) -> None:
        """The local owner-side handlers are not ours to run: the cluster holds this state."""

    @property
    def loop(self):
        return asyncio.get_event_loop()

    def owner_of(self, key: bytes) -> str:
        return key_tag(key)

    def is_local(self, owner) -> bool:
        return False

    def is_down(self, owner) -> bool:
        """Every call for this owner's slot (or every call, while not connected) has failed for
        more than a second: its master is down or failing over (limits may then fail open), not
        one slow answer."""
        since = self._failing.get(owner) or self._failing.get(None)
        return since is not None and time.monotonic() - since > 1.0

    def call(self, owner: str, op: str, payload, timeout: float) -> asyncio.Future:
        return asyncio.ensure_future(self._run(owner, op, payload, timeout))

    def send(self, owner: str, op: str, payload, timeout: float) -> None:
        self.call(owner, op, payload, timeout).add_done_callback(_consume)

    async def _run(self, owner: str, op: str, payload, timeout: float):
        self.stats["cluster_calls"] += 1
        if self.client is None or self._scripts is None:
            self._failed(None)
            raise OwnerUnavailable(f"the state cluster is not connected yet ({self.last_error or 'connecting'})")
        try:
            result = await asyncio.wait_for(self.ops[op](owner, payload), timeout)
        except (OwnerUnavailable, asyncio.TimeoutError, OSError) as e:
            self._failed(owner)
            raise OwnerUnavailable(f"the state cluster did not answer {op!r}: {e!r}") from None
        except Exception as e:
            if type(e).__module__.startswith("glide"):  # connection, timeout, CLUSTERDOWN, TRYAGAIN
                self._failed(owner)
                raise OwnerUnavailable(f"the state cluster failed {op!r}: {e}") from None
            raise
        if self._failing:
            self._failing.pop(owner, None)
            self._failing.pop(None, None)
        return result

    def _failed(self, owner) -> None:
        self.stats["cluster_errors"] += 1
        self.stats["owner_unavailable"] += 1
        self._failing.setdefault(owner, time.monotonic())
        if len(self._failing) > 10000:  # (bounded: a storm of failing tags forgets the oldest)
            self._failing.pop(next(iter(self._failing)))

    def _key(self, kind: str, owner: str, rest: str = "") -> str:
        return f"{self.prefix}:{kind}:{{{owner}}}{rest}"

    async def _script(self, name: str, keys: list, args: list):
        return await self.client.invoke_script(self._scripts[name], keys=keys, args=[str(a) for a in args])

    async def _acked(self, key: str) -> None:
        """Return only once state.write_replicas replicas have the writes sent before (WAIT on the
        node's one connection), so a failover cannot drop an acknowledged write."""
        need = self.st["write_replicas"]
        if not need:
            return
        from glide import SlotKeyRoute, SlotType
        got = await self.client.custom_command(["WAIT", str(need), str(int(self.st["write_ack_timeout"] * 1000))],
                                               route=SlotKeyRoute(SlotType.PRIMARY, key))
        if int(got) < need:
            raise OwnerUnavailable(f"only {got} of {need} replicas acknowledged the write")

    # ---- rate limits --------------------------------------------------------------------------
    async def _buckets(self, owner: str, checks: list, want: int) -> tuple[list, int]:
        keys = [self._key("rl", owner, f":{c[0]:x}") for c in checks]
        args = [want, self.peers]
        for c in checks:
            args += [repr(float(c[1])), repr(float(c[2])), repr(float(c[3]))]
        out = await self._script("take", keys, args)
        return [float(r) for r in out[:-1]], int(out[-1])

    async def _take(self, owner: str, checks: list) -> list:
        return (await self._buckets(owner, checks, 0))[0]

    async def _lease(self, owner: str, msg: list) -> list:
        results, granted = await self._buckets(owner, msg[0], int(msg[1]))
        return [results, granted]

    async def _refund(self, owner: str, refunds: list) -> None:
        await self._script("refund", [self._key("rl", owner, f":{r[0]:x}") for r in refunds],
                           [repr(float(r[1])) for r in refunds])

    # ---- sessions -----------------------------------------------------------------------------
    async def _sess_create(self, owner: str, p: dict):
        rec = new_record(p["tenant"], p["user"], p["key_id"], p["class"], p["attributes"], self.ttl)
        key = self._key("s", owner)
        await self.client.hset(key, {**{f: str(rec[f]) for f in FIELDS}, **{f: repr(rec[f]) for f in NUMBERS},
                                     "attributes": orjson.dumps(rec["attributes"]).decode(), "v": "1"})
        await self.client.pexpire(key, int(self.ttl * 1000))
        await self._acked(key)
        return rec

    async def _read(self, key: str, touch: bool = True):
        now = time.time()
        if touch:
            flat = await self._script("touch", [key], [repr(now), repr(self.ttl)])
        else:
            d = await self.client.hgetall(key)
            flat = [x for kv in d.items() for x in kv] if d else None
        if not flat:
            return None, None
        d = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        rec = {f: d[f] for f in FIELDS}
        rec.update({f: float(d[f]) for f in NUMBERS})
        rec["attributes"] = orjson.loads(d["attributes"])
        return rec, d["v"]

    async def _sess_get(self, owner: str, sid: str):
        return (await self._read(self._key("s", owner)))[0]

    async def _sess_patch(self, owner: str, p: dict):
        key = self._key("s", owner)
        for _ in range(CAS_TRIES):
            rec, version = await self._read(key, touch=False)
            if rec is None or rec["expires_at"] <= time.time():
                return None
            try:
                merged = merge_attributes(rec["attributes"], p["attributes"], self.max_attributes)
            except ValueError:
                return TOO_LARGE
            blob = orjson.dumps(merged)
            now = time.time()
            done = await self._script("cas", [key], [version, blob.decode(), repr(now), repr(self.ttl)])
            if int(done) == 1:
                await self._acked(key)
                return dict(rec, attributes=merged, last_seen=now, expires_at=now + self.ttl)
            if int(done) == -1:
                return None
        return FULL  # (contended past CAS_TRIES: answered 503 like a full store)

    async def _sess_delete(self, owner: str, sid: str) -> bool:
        key = self._key("s", owner)
        existed = await self.client.delete([key])
        await self._acked(key)
        return bool(existed)

    # ---- exact cache --------------------------------------------------------------------------
    async def _xc_read(self, owner: str, key: str, stale: bool):
        blob = await self.client.get(self._key("x", owner))
        if blob is None:
            return None
        k, expires, entry = orjson.loads(blob)
        if k != key or (not stale and expires < time.time()):  # (k: a digest collision is a miss)
            return None
        return entry

    async def _xc_get(self, owner: str, key: str):
        return await self._xc_read(owner, key, False)

    async def _xc_stale(self, owner: str, key: str):
        return await self._xc_read(owner, key, True)

    async def _xc_put(self, owner: str, msg: list) -> bool:
        from glide import ExpirySet, ExpiryType
        key, tenant, entry = msg[:3]
        ttl = min(self.xc_ttl, float(msg[3])) if len(msg) > 3 and msg[3] else self.xc_ttl  # (a request's cache.ttl)
        live = max(1, math.ceil((ttl + self.xc_stale) * 1000))
        name = self._key("x", owner)
        await self.client.set(name, orjson.dumps([key, time.time() + ttl, entry]),
                              expiry=ExpirySet(ExpiryType.MILLSEC, live))
        index = self._key("xt", key_tag(tenant.encode()))  # the tenant's entries, for a purge
        await self.client.sadd(index, [name])
        await self.client.pexpire(index, live)
        return True

    async def purge(self, tenant: str | None) -> int:
        """Drop a tenant's exact-cache entries (every tenant's when None) from the cluster: the
        tenant's index set, or a scan of every master for the prefix. For operators."""
        from glide import ClusterScanCursor
        if tenant is not None:
            index = self._key("xt", key_tag(tenant.encode()))
            names = list(await self.client.smembers(index))
            for name in names:  # (one key at a time: each is in its own slot)
                await self.client.delete([name])
            await self.client.delete([index])
            return len(names)
        n, cursor = 0, ClusterScanCursor()
        while not cursor.is_finished():
            cursor, keys = await self.client.scan(cursor, match=f"{self.prefix}:x*", count=500)
            for name in keys:
                n += await self.client.delete([name])
        return n


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # (a lost send costs a later miss or a refund: never an unhandled error)
