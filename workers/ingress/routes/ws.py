"""GET /v1/ws: persistent sessions over WebSocket, answered by the same routes as HTTP.

The upgrade goes through the guard like any API route (API key or session token; a bad one is
the same 401, before the upgrade). After it, each text message is one request:

    {"id": "c1", "type": "chat.completions", "body": {... the HTTP body ...}}
    {"id": "c2", "type": "cancel", "target": "c1"}

Types: chat.completions, completions, embeddings, responses, predict (body.model names the
model), events, echo, session.get, session.patch. Each becomes a Request for that HTTP route,
with the upgrade's credentials, and goes through the router: the same guard (auth, rate
limits), validation, classes, shedding and handlers as HTTP, not a copy. Replies carry the id:

    {"id": "c1", "status": 200, "body": {...}}                  a whole answer
    {"id": "c1", "event": {... one SSE chunk ...}} ... {"id": "c1", "done": true}   a stream
    {"id": "c1", "status": 429, "error": {...OpenAI error...}}  a refusal
    {"id": "c2", "status": 200, "body": {"cancelled": "c1"}}

A stream's generation runs at most `inference.stream_window` deltas ahead of what the socket
has sent: a client that stops reading pauses it (the slot is kept) rather than having it
buffered, and it resumes as the socket drains. Several requests may be in flight per socket (`websocket.max_outstanding`, then 1008). Cancel
stops a generation as a client leaving does (the sequence is cancelled). While the worker
drains, new requests get 503 and each socket closes with 1001 once its replies are done.
"""
from __future__ import annotations

import asyncio
import time

import orjson

from tidegate.core.http.http11 import HttpError, Request, Response, Stream, Upgrade
from tidegate.core.http.websocket import POLICY, WsSession, handshake, message
from tidegate.ext.httpconn import next_request_id

TYPES = {"chat.completions": ("POST", "/v1/chat/completions"), "completions": ("POST", "/v1/completions"),
         "embeddings": ("POST", "/v1/embeddings"), "responses": ("POST", "/v1/responses"),
         "events": ("POST", "/v1/events"), "echo": ("POST", "/v1/echo"),
         "session.get": ("GET", "/v1/sessions/current"), "session.patch": ("PATCH", "/v1/sessions/current")}
# the upgrade's headers a message request keeps: who is asking, and how to reach back
KEPT = (b"authorization", b"x-api-key", b"host", b"user-agent", b"x-request-id", b"x-tidegate-class")


class StreamReply:
    """A streamed answer's sink (Stream.sink): each SSE `data:` chunk becomes one message."""
    __slots__ = ("session", "rid", "prefix", "cancelled")

    def __init__(self, session: WsSession, rid):
        self.session, self.rid, self.cancelled = session, rid, False
        self.prefix = b'{"id":' + orjson.dumps(rid) + b',"event":'

    @property
    def closed(self) -> bool:
        return self.cancelled or self.session.closed

    @property
    def backed_up(self) -> bool:
        return self.session.backed_up

    def write(self, data: bytes) -> None:
        for frame in data.split(b"\n\n"):
            if frame.startswith(b"data: ") and frame != b"data: [DONE]":
                self.session.send(self.prefix + frame[6:] + b"}")

    def end(self) -> None:
        self.session.inflight.pop(self.rid, None)
        if not self.cancelled:
            self.session.send(message(self.rid, done=True))


class WsRoutes:
    def __init__(self, cfg: dict, hub, router):
        self.wsc, self.hub, self.router = cfg["websocket"], hub, router

    def add_to(self, router, guard) -> None:
        if self.wsc["enabled"]:
            router.add("GET", "/v1/ws", guard(self.upgrade))

    def upgrade(self, req) -> Upgrade:
        if self.hub.draining:
            raise HttpError(503, "the server is shutting down", "draining")
        if req.identity is not None and self.hub.key_full(req.identity.key_id):
            raise HttpError(429, f"this key holds {self.wsc['max_per_key']} WebSockets here (websocket.max_per_key)",
                            "too_many_websockets")
        headers, extensions = handshake(req, self.wsc)
        return Upgrade(lambda transport, r, tail: WsSession(transport, r, tail, self, self.hub, extensions), headers)

    # ---- the session's delegate ---------------------------------------------------------------
    def on_message(self, s: WsSession, text: str) -> None:
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            s.send(_error(None, HttpError(400, "a message must be one JSON object", "invalid_json")))
            return
        rid = msg.get("id") if isinstance(msg, dict) else None
        if not isinstance(msg, dict) or not isinstance(rid, (str, int)) or isinstance(rid, bool) \
                or (isinstance(rid, str) and not 0 < len(rid) <= 128):
            s.send(_error(None, HttpError(400, "a message is {id: string or integer, type, body}", "invalid_message",
                                          param="id")))
            return
        kind = msg.get("type")
        if kind == "cancel":
            self._cancel(s, rid, msg.get("target"))
            return
        route = TYPES.get(kind)
        if kind == "predict":
            model = (msg.get("body") or {}).get("model") if isinstance(msg.get("body"), dict) else None
            route = ("POST", f"/v1/predict/{model}") if isinstance(model, str) and model else None
        if route is None:
            s.send(_error(rid, HttpError(400, f"unknown type {kind!r}: one of {', '.join([*TYPES, 'predict', 'cancel'])}",
                                         "invalid_type", param="type")))
            return
        if rid in s.inflight:
            s.send(_error(rid, HttpError(400, f"id {rid!r} is already in flight on this socket", "duplicate_id",
                                         param="id")))
            return
        if self.hub.draining:
            s.send(_error(rid, HttpError(503, "the server is shutting down", "draining")))
            return
        if len(s.inflight) >= self.wsc["max_outstanding"]:
            s.close(POLICY, f"more than {self.wsc['max_outstanding']} requests in flight")
            return
        body = msg.get("body")
        req = self._request(s, route, b"" if body is None else orjson.dumps(body))
        s.inflight[rid] = req
        try:
            resp = self.router.dispatch(req)
        except HttpError as e:
            resp = e.response()
        except Exception as e:  # a handler bug answers this request, the socket stays up
            self.hub.log.error("websocket request failed", route=req.route, error=repr(e))
            resp = HttpError(500, "internal error", "internal").response()
        self._answer(s, rid, req, resp)

    def _request(self, s: WsSession, route: tuple, body: bytes) -> Request:
        up = s.req
        req = Request()
        req.method, req.path = route
        req.query, req.body, req.version, req.keep_alive = b"", body, "1.1", True
        req.headers = {k: v for k, v in up.headers.items() if k in KEPT}
        req.headers[b"content-type"] = b"application/json"
        req.headers[b"content-length"] = str(len(body)).encode()
        req.request_id, req.started, req.route = next_request_id(), time.perf_counter(), "unmatched"
        return req

    def _answer(self, s: WsSession, rid, req: Request, resp) -> None:
        if type(resp) is Response:
            s.inflight.pop(rid, None)
            if not s.closed:
                s.send(_reply(rid, resp))
        elif type(resp) is Stream:
            reply = StreamReply(s, rid)
            s.inflight[rid] = (req, resp, reply)
            resp.to_sink(reply)
        elif type(resp) is Upgrade:
            s.inflight.pop(rid, None)
            s.send(_error(rid, HttpError(400, "an upgrade inside a WebSocket", "bad_upgrade")))
        else:  # a future or coroutine: answer when it resolves
            fut = resp if isinstance(resp, asyncio.Future) else asyncio.ensure_future(resp)
            fut.add_done_callback(lambda f: self._resolved(s, rid, req, f))

    def _resolved(self, s: WsSession, rid, req, fut) -> None:
        if s.inflight.get(rid) is not req:  # cancelled (or the socket closed) meanwhile
            return
        try:
            resp = fut.result()
        except HttpError as e:
            resp = e.response()
        except BaseException as e:
            self.hub.log.error("websocket request failed", route=req.route, error=repr(e))
            resp = HttpError(500, "internal error", "internal").response()
        self._answer(s, rid, req, resp)

    def _cancel(self, s: WsSession, rid, target) -> None:
        what = s.inflight.pop(target, None)
        if what is None:
            s.send(_error(rid, HttpError(404, f"no request {target!r} in flight on this socket", "not_found",
                                         param="target")))
            return
        _stop(what)
        s.send(message(rid, status=200, body={"cancelled": target}))

    def on_drain(self, s: WsSession) -> None:
        for what in list(s.inflight.values()):
            if isinstance(what, tuple):  # a stream: (request, Stream, StreamReply)
                what[1].drained()

    def on_close(self, s: WsSession) -> None:
        """The socket is gone: stop whatever it still had in flight."""
        for what in list(s.inflight.values()):
            _stop(what)
        s.inflight.clear()


def _stop(what) -> None:
    """Stop one in-flight request as a client leaving would: its generation is cancelled."""
    if isinstance(what, tuple):  # a stream: (request, Stream, StreamReply)
        _req, st, reply = what
        reply.cancelled = True
        if st.on_close is not None and not st.finished:
            st.on_close()
        st.end()
    elif what.on_close is not None:  # not answered yet: the handler hears the client left
        what.on_close()


def _reply(rid, resp: Response) -> bytes:
    body = resp.body
    key = b',"body":' if resp.status < 400 else b',"error":'
    if resp.status >= 400 and body.startswith(b'{"error":'):
        body = body[9:-1]  # (the error object itself)
    if not body:
        body = b"null"
    elif resp.content_type != b"application/json":
        body = orjson.dumps(body.decode("utf-8", "replace"))
    return b'{"id":' + orjson.dumps(rid) + b',"status":' + str(resp.status).encode() + key + body + b"}"


def _error(rid, e: HttpError) -> bytes:
    return message(rid, status=e.status, error=e.body()["error"])
