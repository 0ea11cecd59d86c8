"""The session API and the authentication every API route goes through.

    POST   /v1/sessions          (API key)        open a session for a user id: token + expiry
    GET    /v1/sessions/current  (session token)  the session: tenant, user, times, attributes
    PATCH  /v1/sessions/current  (session token)  merge attributes (null removes a key)
    DELETE /v1/sessions/current  (session token)  log out

A session lives at the ring owner of its id (the SHA-256 of its token) and every operation on it
goes there: a direct call when this worker is the owner, a mesh hop otherwise. When the owner
does not answer, session callers get 503: authentication fails closed. An unknown, expired or
deleted token gets exactly the 401 that a bad API key gets, after the same one owner lookup.
"""
from __future__ import annotations

import orjson

from tidegate.core.auth import UNAUTHORIZED, Identity, presented_token
from tidegate.core.http11 import HttpError, Response, json_response
from tidegate.core.jsonbody import parse_json
from tidegate.core.mesh import OwnerUnavailable
from tidegate.core.sessions import PREFIX, SessionStore, new_token, token_id

ANONYMOUS = Identity("anonymous", "anonymous", "anonymous", "standard")  # when no API keys are configured


class SessionService:
    """Owner-side operations (mesh handlers) and the HTTP routes, for one ingress worker."""

    def __init__(self, cfg: dict, slot: int, ring, keys, limiter, store: SessionStore):
        self.cfg, self.slot, self.ring, self.keys, self.limiter, self.store = (
            cfg["sessions"], slot, ring, keys, limiter, store)
        self.limits = cfg["limits"]
        self.mesh = None
        self._ops = self.handlers()

    # ---- at the owner -------------------------------------------------------------------------
    def handlers(self) -> dict:
        return {"sess.create": self._create, "sess.get": self._get, "sess.patch": self._patch,
                "sess.delete": self._delete}

    def _create(self, p):
        try:
            return self.store.create(p["sid"], p["tenant"], p["user"], p["key_id"], p["class"], p["attributes"])
        except OverflowError:
            return None

    def _get(self, sid):
        return self.store.get(sid)

    def _patch(self, p):
        return self.store.patch(p["sid"], p["attributes"])

    def _delete(self, sid):
        return self.store.delete(sid)

    async def _ask(self, sid: str, op: str, payload):
        owner = self.ring.owner(sid)
        try:
            if owner == self.slot or self.mesh is None:
                return self._ops[op](payload)
            return await self.mesh.request(owner, op, payload, self.cfg["owner_timeout"])
        except OwnerUnavailable:
            self.limiter.stats["owner_unavailable"] += 1
            raise HttpError(503, "the session's owner is unavailable; retry shortly", "owner_unavailable",
                            headers=[(b"retry-after", b"1")]) from None

    # ---- authentication for every API route ---------------------------------------------------
    def guard(self, handler, session_only: bool = False):
        """Wrap a route: authenticate by session token or API key, then rate-limit."""
        keys, limiter = self.keys, self.limiter
        if not session_only and not keys.enabled and not limiter.enabled:
            return handler  # an open gateway: nothing to check, nothing to pay

        def guarded(req):
            token = presented_token(req.headers)
            if token.startswith(PREFIX):
                return self._with_session(token, handler, req)
            if session_only:
                raise UNAUTHORIZED
            if keys.enabled:
                req.identity = keys.authenticate(token)
            else:
                req.identity = ANONYMOUS
            return limiter.check(req.identity, handler, req) if limiter.enabled else handler(req)
        return guarded

    async def _with_session(self, token: bytes, handler, req):
        sid = token_id(token)
        rec = await self._ask(sid, "sess.get", sid)
        if rec is None:
            raise UNAUTHORIZED
        req.identity = Identity(rec["key_id"], rec["user"], rec["tenant"], rec["class"], rec["user"], sid, rec)
        resp = self.limiter.check(req.identity, handler, req) if self.limiter.enabled else handler(req)
        return resp if resp.__class__ is Response else await resp

    # ---- routes -------------------------------------------------------------------------------
    def _attributes(self, body: dict) -> dict:
        attrs = body.get("attributes", {})
        if not isinstance(attrs, dict):
            raise HttpError(400, "attributes must be a JSON object", "invalid_attributes")
        if len(orjson.dumps(attrs)) > self.cfg["max_attributes_bytes"]:
            raise HttpError(400, f"attributes larger than {self.cfg['max_attributes_bytes']} bytes",
                            "attributes_too_large")
        return attrs

    async def create(self, req) -> Response:
        body = parse_json(req, self.limits)
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object with a 'user' string", "invalid_request")
        user = body.get("user")
        if not isinstance(user, str) or not 0 < len(user) <= 128:
            raise HttpError(400, "'user' must be a string of 1 to 128 characters", "invalid_user")
        attrs = self._attributes(body)
        ident = req.identity
        token = new_token()
        sid = token_id(token)
        rec = await self._ask(sid, "sess.create", {"sid": sid, "tenant": ident.tenant, "user": user,
                                                   "key_id": ident.key_id, "class": ident.klass,
                                                   "attributes": attrs})
        if rec is None:
            raise HttpError(503, "session capacity reached; retry later", "session_capacity",
                            headers=[(b"retry-after", b"5")])
        return json_response(dict(_public(rec), token=token.decode()), 201)

    def current(self, req) -> Response:
        return json_response(_public(req.identity.record))  # fetched (and touched) by the guard

    async def patch(self, req) -> Response:
        body = parse_json(req, self.limits)
        if not isinstance(body, dict) or "attributes" not in body:
            raise HttpError(400, "body must be a JSON object with 'attributes'", "invalid_request")
        attrs = self._attributes(body)
        sid = req.identity.session
        rec = await self._ask(sid, "sess.patch", {"sid": sid, "attributes": attrs})
        if rec is None:
            raise UNAUTHORIZED
        return json_response(_public(rec))

    async def delete(self, req) -> Response:
        sid = req.identity.session
        await self._ask(sid, "sess.delete", sid)
        return json_response({"object": "session.deleted", "deleted": True})


def _public(rec: dict) -> dict:
    return {"object": "session", "tenant": rec["tenant"], "user": rec["user"], "created_at": rec["created_at"],
            "last_seen": rec["last_seen"], "expires_at": rec["expires_at"], "attributes": rec["attributes"]}
