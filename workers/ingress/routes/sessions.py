"""The session API.

    POST   /v1/sessions          (API key)        open a session for a user id: token + expiry
    GET    /v1/sessions/current  (session token)  the session: tenant, user, times, attributes
    PATCH  /v1/sessions/current  (session token)  merge attributes (null removes a key)
    DELETE /v1/sessions/current  (session token)  log out

A session lives at the ring owner of its id (the SHA-256 of its token); every operation goes
there through the guard's session_call (a direct call or one mesh hop, decided by Owners). The
owner-side handlers live with the store in core/state/sessions.py.
"""
from __future__ import annotations

import orjson

from tidegate.core.http.http11 import HttpError, json_response, service_unavailable
from tidegate.core.http.jsonbody import parse_json
from tidegate.core.messaging.protocol import SESS_CREATE, SESS_DELETE, SESS_PATCH
from tidegate.core.state.sessions import FULL, KEY_FULL, TOO_LARGE, new_token, token_id
from tidegate.workers.ingress.guard import UNAUTHORIZED, caller


class SessionRoutes:
    def __init__(self, cfg: dict, guard):
        self.sc, self.limits, self.guard = cfg["sessions"], cfg["limits"], guard

    def add_to(self, router, guard) -> None:
        router.add("POST", "/v1/sessions", guard(self.create, key_only=True))  # a session's user is fixed
        router.add("GET", "/v1/sessions/current", guard(self.current, session_only=True))
        router.add("PATCH", "/v1/sessions/current", guard(self.patch, session_only=True))
        router.add("DELETE", "/v1/sessions/current", guard(self.delete, session_only=True))

    def _attributes(self, body: dict) -> dict:
        attrs = body.get("attributes", {})
        if not isinstance(attrs, dict):
            raise HttpError(400, "attributes must be a JSON object", "invalid_attributes")
        if len(orjson.dumps(attrs)) > self.sc["max_attributes_bytes"]:
            raise HttpError(400, f"attributes larger than {self.sc['max_attributes_bytes']} bytes",
                            "attributes_too_large")
        return attrs

    async def create(self, req):
        body = parse_json(req, self.limits)
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object with a 'user' string", "invalid_request")
        user = body.get("user")
        if not isinstance(user, str) or not 0 < len(user) <= 128:
            raise HttpError(400, "'user' must be a string of 1 to 128 characters", "invalid_user")
        attrs = self._attributes(body)
        ident = caller(req)
        token = new_token()
        sid = token_id(token)
        rec = await self.guard.session_call(sid, SESS_CREATE, {"sid": sid, "tenant": ident.tenant, "user": user,
                                                               "key_id": ident.key_id, "class": ident.klass,
                                                               "attributes": attrs})
        if rec is None:
            raise service_unavailable("session capacity reached; retry later", "session_capacity", retry_after=5)
        if rec == KEY_FULL:
            raise HttpError(429, f"this API key holds its share of sessions (sessions.max_per_key, "
                            f"{self.sc['max_per_key']} per owner): delete some or let them expire",
                            "too_many_sessions", headers=[(b"retry-after", b"60")])
        return json_response(dict(_public(rec), token=token.decode()), 201)

    def current(self, req):
        return json_response(_public(req.identity.record))  # fetched (and touched) by the guard

    async def patch(self, req):
        body = parse_json(req, self.limits)
        if not isinstance(body, dict) or "attributes" not in body:
            raise HttpError(400, "body must be a JSON object with 'attributes'", "invalid_request")
        attrs = self._attributes(body)
        sid = req.identity.session
        rec = await self.guard.session_call(sid, SESS_PATCH, {"sid": sid, "attributes": attrs})
        if rec is None:
            raise UNAUTHORIZED
        if rec == TOO_LARGE:
            raise HttpError(400, f"attributes would be larger than {self.sc['max_attributes_bytes']} bytes once "
                            "merged", "attributes_too_large", param="attributes")
        if rec == FULL:
            raise service_unavailable("session storage is full; retry later", "session_capacity", retry_after=5)
        return json_response(_public(rec))

    async def delete(self, req):
        sid = req.identity.session
        await self.guard.session_call(sid, SESS_DELETE, sid)
        return json_response({"object": "session.deleted", "deleted": True})


def _public(rec: dict) -> dict:
    return {"object": "session", "tenant": rec["tenant"], "user": rec["user"], "created_at": rec["created_at"],
            "last_seen": rec["last_seen"], "expires_at": rec["expires_at"], "attributes": rec["attributes"]}
