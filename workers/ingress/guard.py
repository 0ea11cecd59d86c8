"""What every API route goes through first: authentication, then the rate limit.

A chain of wrapping handlers in tornado's manner, each adding one behaviour around the next:

    authenticated(rate_limited(route handler))

`authenticated` sets `req.identity` from an API key (no hop: every worker holds the key table)
or a session token (one call to the session's ring owner; when it does not answer the caller
gets 503: authentication fails closed). Unknown, expired and deleted credentials all get the
same 401. `rate_limited` asks the limiter for a decision and turns a Refusal into 429 (with
Retry-After and the RateLimit-* headers) or 503. A handler returns a Response or an awaitable;
the chain stays on callbacks (no Task) whenever it can.
"""
from __future__ import annotations

import asyncio

from tidegate.core.http.http11 import HttpError, Response, service_unavailable
from tidegate.core.messaging.mesh import OwnerUnavailable
from tidegate.core.messaging.protocol import SESS_GET
from tidegate.core.state.auth import ANONYMOUS, Identity, presented_token
from tidegate.core.state.ratelimit import Refusal
from tidegate.core.state.sessions import PREFIX, token_id

UNAUTHORIZED = HttpError(401, "missing or invalid credentials", "invalid_api_key",
                         headers=[(b"www-authenticate", b'Bearer realm="tidegate"')])
KEY_ONLY = HttpError(403, "this route takes an API key, not a session token (a session cannot open sessions: "
                     "its user is fixed)", "api_key_required")


def caller(req) -> Identity:
    """Who is asking: the guard's identity, or the anonymous tenant on an open gateway (no API
    keys and no request limits, where the guard lets routes through unwrapped)."""
    return req.identity or ANONYMOUS


def refusal_error(r: Refusal) -> HttpError:
    if r.status == 503:
        return service_unavailable("rate-limit owner unavailable; retry shortly", "owner_unavailable")
    return HttpError(429, "rate limit exceeded; retry after the time in Retry-After", "rate_limit_exceeded",
                     headers=[(b"retry-after", str(r.retry_after).encode()), (b"ratelimit-limit", b"%d" % r.limit),
                              (b"ratelimit-remaining", b"0"), (b"ratelimit-reset", str(r.reset).encode())])


class Guard:
    def __init__(self, cfg: dict, keys, owners, limiter):
        self.keys, self.owners, self.limiter = keys, owners, limiter
        self.session_timeout = cfg["sessions"]["owner_timeout"]

    def __call__(self, handler, session_only: bool = False, key_only: bool = False):
        """Wrap a route: authenticate by session token or API key (session_only / key_only: only
        that one), then rate-limit."""
        if not session_only and not key_only and not self.keys.enabled and not self.limiter.enabled:
            return handler  # an open gateway: nothing to check, nothing to pay
        if self.limiter.enabled:
            handler = self._rate_limited(handler)
        return self._authenticated(handler, session_only, key_only)

    # ---- authentication -----------------------------------------------------------------------
    def _authenticated(self, handler, session_only: bool, key_only: bool = False):
        keys = self.keys

        def authenticated(req):
            token = presented_token(req.headers)
            if token.startswith(PREFIX):
                if key_only:
                    raise KEY_ONLY
                return self._with_session(token, handler, req)
            if session_only:
                raise UNAUTHORIZED
            if keys.enabled:
                ident = keys.authenticate(token)
                if ident is None:
                    raise UNAUTHORIZED
                req.identity = ident
            else:
                req.identity = ANONYMOUS
            return handler(req)
        return authenticated

    async def _with_session(self, token: bytes, handler, req):
        sid = token_id(token)
        rec = await self.session_call(sid, SESS_GET, sid)
        if rec is None or self.keys.enabled and rec["key_id"] not in self.keys.key_ids:
            raise UNAUTHORIZED  # unknown, expired, or opened with an API key that has since been removed
        req.identity = Identity(rec["key_id"], rec["user"], rec["tenant"], rec["class"], rec["user"], sid, rec)
        resp = handler(req)
        if resp.__class__ is Response or not (asyncio.isfuture(resp) or asyncio.iscoroutine(resp)):
            return resp  # (a Response, a Stream or an Upgrade)
        return await resp

    async def session_call(self, sid: str, op: str, payload):
        """Run a session op at the session's owner; 503 when it does not answer."""
        owners = self.owners
        try:
            result = owners.call(owners.owner_of(sid.encode()), op, payload, self.session_timeout)
            return await result if asyncio.isfuture(result) else result
        except OwnerUnavailable:
            raise service_unavailable("the session's owner is unavailable; retry shortly",
                                      "owner_unavailable") from None

    # ---- rate limit ---------------------------------------------------------------------------
    def _rate_limited(self, handler):
        admit = self.limiter.admit

        def rate_limited(req):
            decision = admit(req.identity)
            if decision is None:
                return handler(req)
            if decision.__class__ is Refusal:
                raise refusal_error(decision)
            out = decision.get_loop().create_future()  # the owner is a hop away
            decision.add_done_callback(lambda d: _after_decision(d, handler, req, out))
            return out
        return rate_limited


def _after_decision(decision: asyncio.Future, handler, req, out: asyncio.Future) -> None:
    try:
        refusal = decision.result()
        if refusal is not None:
            raise refusal_error(refusal)
        resp = handler(req)
    except BaseException as e:
        out.set_exception(e)
        return
    if resp.__class__ is Response or not asyncio.isfuture(resp) and not asyncio.iscoroutine(resp):
        out.set_result(resp)
    else:  # an async handler: chain its outcome into out
        asyncio.ensure_future(resp).add_done_callback(lambda done: _chain(done, out))


def _chain(done: asyncio.Future, out: asyncio.Future) -> None:
    if out.done():
        return
    if done.exception() is not None:
        out.set_exception(done.exception())
    else:
        out.set_result(done.result())
