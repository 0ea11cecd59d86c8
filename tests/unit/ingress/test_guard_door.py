"""The guard (authentication, then the rate limit) and the door (shedding before a large body is
read), without the daemon: real ApiKeys, Classes and Shedder, owners and limiter stand-ins."""
import asyncio

import pytest

from tidegate.core.base import config
from tidegate.core.http.http11 import HttpError
from tidegate.core.messaging.mesh import OwnerUnavailable
from tidegate.core.overload.classes import Classes
from tidegate.core.overload.shedding import Shedder
from tidegate.core.state.auth import ApiKeys, hash_key
from tidegate.core.state.ratelimit import Refusal
from tidegate.ext.httpconn import Request
from tidegate.workers.ingress.door import EarlyShed
from tidegate.workers.ingress.guard import Guard

CFG = config.load(None, {})
KEYS = ApiKeys([{"key_sha256": hash_key("sk-good"), "tenant": "acme", "class": "standard"}], CFG["classes"])


class Limiter:
    def __init__(self, decision=None, enabled=True):
        self.decision, self.enabled, self.asked = decision, enabled, []

    def admit(self, ident):
        self.asked.append(ident.tenant)
        return self.decision


class SessionOwners:
    def __init__(self, answer):
        self.answer = answer

    def owner_of(self, key):
        return 0

    def call(self, owner, op, payload, timeout):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def request(token: bytes | None = None) -> Request:
    req = Request.__new__(Request)
    req.path, req.method, req.identity = "/v1/echo", "POST", None
    req.headers = {b"authorization": b"Bearer " + token} if token else {}
    return req


def call(handler, req):
    out = handler(req)
    if asyncio.iscoroutine(out) or asyncio.isfuture(out):
        async def wait():
            return await out
        return asyncio.run(wait())
    return out


def seen(req):
    return req.identity


def test_an_open_gateway_passes_handlers_through_unwrapped():
    g = Guard(CFG, ApiKeys([], CFG["classes"]), SessionOwners(None), Limiter(enabled=False))
    assert g(seen) is seen


def test_an_api_key_names_the_caller_and_a_bad_one_is_401():
    limiter = Limiter()
    g = Guard(CFG, KEYS, SessionOwners(None), limiter)(seen)
    assert call(g, request(b"sk-good")).tenant == "acme" and limiter.asked == ["acme"]
    for token in (None, b"sk-bad"):
        with pytest.raises(HttpError) as e:
            call(g, request(token))
        assert e.value.status == 401 and limiter.asked == ["acme"]  # refused before the rate limit


def test_a_refusal_is_429_with_retry_after():
    g = Guard(CFG, KEYS, SessionOwners(None), Limiter(Refusal(429, 3, 10, 5)))(seen)
    with pytest.raises(HttpError) as e:
        call(g, request(b"sk-good"))
    assert e.value.status == 429 and (b"retry-after", b"3") in e.value.headers


def test_a_session_token_asks_its_owner_and_fails_closed():
    rec = {"key_id": KEYS.authenticate(b"sk-good").key_id, "user": "u1", "tenant": "acme", "class": "critical"}
    token = b"tgs-" + b"x" * 43
    ok = Guard(CFG, KEYS, SessionOwners(rec), Limiter())(seen)
    assert call(ok, request(token)).user == "u1"
    for answer, status in ((None, 401), (OwnerUnavailable("down"), 503)):
        with pytest.raises(HttpError) as e:
            call(Guard(CFG, KEYS, SessionOwners(answer), Limiter())(seen), request(token))
        assert e.value.status == status


def door(policy: str, shedding: bool):
    cfg = config.load(None, {"overload.shed": {"standard": policy}})

    class View:
        def shedding(self, source, cls):
            return 2 if shedding else None
    return EarlyShed(KEYS, Classes(cfg), Shedder(cfg, View()), [{"name": "demo"}], {})


def test_the_door_refuses_a_shed_reject_class_before_its_body():
    e = door("reject", True)(b"/v1/chat/completions", {b"authorization": b"Bearer sk-good"})
    assert e.status == 503 and (b"x-tidegate-shed", b"standard") in e.headers
    assert door("reject", False)(b"/v1/chat/completions", {b"authorization": b"Bearer sk-good"}) is None
    # a cached class is let in (its answer is keyed by the body); other routes and unknown callers too
    assert door("cached", True)(b"/v1/chat/completions", {b"authorization": b"Bearer sk-good"}) is None
    assert door("reject", True)(b"/v1/echo", {b"authorization": b"Bearer sk-good"}) is None
    assert door("reject", True)(b"/v1/chat/completions", {b"authorization": b"Bearer sk-bad"}) is None
