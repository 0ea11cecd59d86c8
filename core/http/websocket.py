"""WebSockets (RFC 6455) after an HTTP upgrade: limits, pings, close, over a codec (wscodec.py:
frames parsed in C by ext/wsframe.pyx, or by wsproto when permessage-deflate was negotiated).

`handshake(req, cfg)` checks an upgrade request and returns the 101's headers (and the
permessage-deflate extension when configured and offered); `WsSession` is the asyncio Protocol
the connection switches to (ext/httpconn.pyx `Upgrade`). A session turns complete text messages
into `on_message(session, text)` calls on its delegate, and sends what the delegate gives it.
Behaviour stays in the delegate (workers/ingress/routes/ws.py maps messages to the HTTP routes),
so this module knows frames, limits and closing, nothing about the API.

Limits (config [websocket]), each closing with a code and reason: a message over
`max_message_bytes` or more than `max_fragments` frames (1009), more control frames than
`max_control_per_s` in a second (1008: ping floods), a peer that does not answer the server's
pings within `ping_timeout` (closed), more than `send_buffer_bytes` queued for a reader that
does not read (1008). Streams do not get there: past half of it the session is `backed_up`, its
streams stop giving credit to their generations (which pause), and resume_writing wakes them. `WsHub` keeps the worker's sessions: one sweep a second sends pings and
closes dead peers (no timer per socket); drain() closes each with 1001 once its in-flight
replies are done.
"""
from __future__ import annotations

import base64
import codecs
import hashlib
import time

import orjson
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from tidegate.core.http.http11 import HttpError
from tidegate.core.http.wscodec import BINARY, CLOSE, ERROR, PING, PONG, TEXT, FrameCodec, WsprotoCodec

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLOSE_WAIT_S = 1.0  # after our close frame, how long the peer has to answer with its own
TOO_BIG, POLICY, GOING_AWAY, INTERNAL, BAD_DATA = CloseReason.MESSAGE_TOO_BIG, CloseReason.POLICY_VIOLATION, \
    CloseReason.GOING_AWAY, CloseReason.INTERNAL_ERROR, CloseReason.INVALID_FRAME_PAYLOAD_DATA


def handshake(req, cfg: dict) -> tuple[list, list]:
    """(101 headers, extensions) for a valid RFC 6455 upgrade request, else HttpError 400/426."""
    h = req.headers
    if req.method != "GET":
        raise HttpError(405, "a WebSocket upgrade is a GET", "method_not_allowed")
    if b"websocket" not in h.get(b"upgrade", b"").lower() or b"upgrade" not in h.get(b"connection", b"").lower():
        raise HttpError(426, "this route speaks WebSocket only: send Upgrade: websocket", "upgrade_required",
                        headers=[(b"upgrade", b"websocket")])
    if h.get(b"sec-websocket-version") != b"13":
        raise HttpError(426, "only WebSocket version 13 is supported", "unsupported_version",
                        headers=[(b"sec-websocket-version", b"13")])
    key = h.get(b"sec-websocket-key", b"")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise HttpError(400, "Sec-WebSocket-Key must be 16 random bytes, base64", "bad_upgrade") from None
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    headers = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"), (b"sec-websocket-accept", accept)]
    extensions = []
    offer = h.get(b"sec-websocket-extensions", b"").decode("latin-1")
    if cfg["permessage_deflate"]:
        for one in offer.split(","):
            if one.strip().split(";")[0].strip() == "permessage-deflate":
                ext = PerMessageDeflate()
                params = ext.accept(one.strip())
                if params is not None:
                    headers.append((b"sec-websocket-extensions",
                                    ("permessage-deflate; " + params if params else "permessage-deflate").encode()))
                    extensions.append(ext)
                break
    return headers, extensions


class WsSession:
    """One WebSocket connection (an asyncio Protocol). The delegate has on_message(session,
    text), on_close(session); session.send(bytes of JSON) and session.close(code, reason)."""
    __slots__ = ("codec", "transport", "delegate", "hub", "req", "_parts", "_utf8", "_nbytes", "_ctl", "_ctl_at",
                 "last_seen", "last_pong", "last_message", "ping_sent", "closed", "inflight", "backed_up", "owner",
                 "__weakref__")

    def __init__(self, transport, req, tail: bytes, delegate, hub: "WsHub", extensions: list):
        self.transport, self.req, self.delegate, self.hub = transport, req, delegate, hub
        self.codec = WsprotoCodec(extensions) if extensions else FrameCodec(hub.wsc["max_message_bytes"])
        self._parts, self._utf8, self._nbytes = None, None, 0  # a fragmented message's pieces so far
        self._ctl, self._ctl_at = 0, 0.0
        self.last_seen, self.ping_sent, self.closed = hub.now, 0.0, False
        self.last_pong = self.last_message = hub.now  # liveness is the peer's pongs; idleness its messages
        peer = transport.get_extra_info("peername")
        self.owner = (getattr(req.identity, "key_id", ""), peer[0] if peer else "")  # (key, address): the caps
        self.inflight = {}  # request id -> what cancels it (the delegate's)
        self.backed_up = False  # the transport holds more than its high-water mark: streams wait
        # streams pause at half the send buffer (their generations stop); a reply that would
        # take a non-reader past all of it closes the socket instead (send)
        transport.set_write_buffer_limits(high=hub.wsc["send_buffer_bytes"] // 2)
        # (the connection capped the kernel's send buffer at the upgrade: limits.stream_send_buffer)
        over = hub.add(self)
        if over:
            self.close(POLICY, over)
            return
        if tail:
            hub.loop.call_soon(self.data_received, tail)

    # ---- asyncio Protocol ---------------------------------------------------------------------
    def connection_made(self, transport) -> None:  # (set_protocol does not call it; kept for the interface)
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.hub.discard(self)
        self.delegate.on_close(self)

    def eof_received(self):
        return False

    def pause_writing(self) -> None:
        self.backed_up = True

    def resume_writing(self) -> None:
        """Drained: the streams that stopped giving credit to their generations give it again."""
        self.backed_up = False
        self.delegate.on_drain(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            self._closing_data(data)
            return
        self.last_seen = self.hub.now
        self.hub.bytes_in += len(data)
        for event in self.codec.receive(data):
            if self.closed:
                return
            op = event[0]
            if op == TEXT or op == BINARY:
                self._on_frame(event)
            elif op == PING:
                if self._control():
                    self._write(self.codec.pong(event[2]))
            elif op == PONG:
                self._control()
                self.ping_sent, self.last_pong = 0.0, self.hub.now
            elif op == CLOSE:  # the peer's: answer with its code, then end the connection
                self._write(self.codec.close(event[1], ""))
                self.closed = True
                self.transport.close()
            else:  # a protocol error from the peer (bad frame, bad close, a frame over the limit)
                self.close(event[1], f"protocol error: {event[2]}"[:120])

    def _control(self) -> bool:
        """Count a control frame; past the rate the peer is flooding: 1008."""
        now = self.hub.now
        if now - self._ctl_at >= 1.0:
            self._ctl, self._ctl_at = 0, now
        self._ctl += 1
        if self._ctl > self.hub.wsc["max_control_per_s"]:
            self.close(POLICY, f"more than {self.hub.wsc['max_control_per_s']} control frames a second")
            return False
        return True

    def _on_frame(self, event: tuple) -> None:
        """A text or binary frame (or, with deflate, a piece of one): the message's limits, and
        the whole message, as UTF-8 text, to the delegate. A fragmented message is checked as
        UTF-8 fragment by fragment, so a bad one closes as soon as it arrives (as wsproto does)."""
        op, fin, data = event
        cfg = self.hub.wsc
        self._nbytes += len(data)
        if self._nbytes > cfg["max_message_bytes"]:
            self.close(TOO_BIG, f"message larger than {cfg['max_message_bytes']} bytes")
            return
        try:
            if self._parts is None and fin:  # (the common case: one whole frame)
                text = data.decode("utf-8")
            else:
                if self._parts is None:
                    self._parts, self._utf8 = [], codecs.getincrementaldecoder("utf-8")()
                if len(self._parts) >= cfg["max_fragments"]:
                    self.close(TOO_BIG, f"message in more than {cfg['max_fragments']} fragments")
                    return
                self._parts.append(self._utf8.decode(data, fin))
                if not fin:
                    return
                text = "".join(self._parts)
        except UnicodeDecodeError:
            self.close(BAD_DATA, "text messages must be UTF-8" if op == TEXT else "binary messages must be UTF-8 JSON")
            return
        self._parts, self._utf8, self._nbytes = None, None, 0
        self.last_message = self.hub.now
        try:
            self.delegate.on_message(self, text)
        except Exception as e:  # a delegate bug must not take the worker down
            self.hub.log.error("websocket message failed", error=repr(e))
            self.close(INTERNAL, "internal error")

    # ---- sending ------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if data and not self.transport.is_closing():
            self.transport.write(data)
            self.hub.bytes_out += len(data)

    def send(self, payload: bytes) -> bool:
        """One text message (JSON bytes). False once closed, or when the reader fell behind by
        more than send_buffer_bytes (then the socket closes with 1008)."""
        if self.closed:
            return False
        if self.transport.get_write_buffer_size() > self.hub.wsc["send_buffer_bytes"]:
            self.close(POLICY, "the client is not reading: send buffer full")
            return False
        self._write(self.codec.text(payload))
        return True

    def close(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str = "") -> None:
        """Send the close frame, then wait (at most CLOSE_WAIT_S) for the peer's before closing
        the TCP connection, so a peer still sending reads our reason rather than a reset."""
        if self.closed:
            return
        self.closed = True
        try:
            self._write(self.codec.close(code, reason))
        except Exception:
            self.transport.close()
            return
        self.hub.loop.call_later(CLOSE_WAIT_S, self.transport.close)

    def _closing_data(self, data: bytes) -> None:
        """After our close frame: only the peer's close (or garbage) matters; the rest is dropped."""
        for event in self.codec.receive(data):
            if event[0] == CLOSE or event[0] == ERROR:
                self.transport.close()
                return

    def ping(self) -> None:
        self.ping_sent = self.hub.now
        self._write(self.codec.ping(b"tg"))


class WsHub:
    """The worker's WebSocket sessions: the ping/dead-peer sweep, drain, counters."""

    def __init__(self, wsc: dict, loop, log, server=None):
        self.wsc, self.loop, self.log, self.server = wsc, loop, log, server  # wsc: the [websocket] section
        self.sessions: set[WsSession] = set()
        self.now = time.monotonic()
        self.draining = False
        self.bytes_in = self.bytes_out = 0
        self.stats = {"ws_opened": 0, "ws_closed_dead": 0, "ws_refused_cap": 0}
        self.by_key: dict[str, int] = {}
        self.by_address: dict[str, int] = {}

    def counters(self) -> dict:
        return dict(self.stats, ws_open=len(self.sessions))

    def key_full(self, key: str) -> bool:
        """Has this API key its max_per_key sockets open here? (asked before the upgrade: 429)"""
        return self.by_key.get(key, 0) >= self.wsc["max_per_key"]

    def add(self, s: WsSession) -> str | None:
        """Count s in; the reason to close it at once when its address is over max_per_address."""
        self.sessions.add(s)
        self.stats["ws_opened"] += 1
        key, addr = s.owner
        self.by_key[key] = self.by_key.get(key, 0) + 1
        self.by_address[addr] = self.by_address.get(addr, 0) + 1
        self._count()
        if self.by_address[addr] > self.wsc["max_per_address"]:
            self.stats["ws_refused_cap"] += 1
            return f"more than {self.wsc['max_per_address']} WebSockets from this address"
        return None

    def discard(self, s: WsSession) -> None:
        if s in self.sessions:
            self.sessions.discard(s)
            key, addr = s.owner
            for table, k in ((self.by_key, key), (self.by_address, addr)):
                table[k] -= 1
                if not table[k]:
                    del table[k]
        self._count()

    def _count(self) -> None:
        srv = self.server
        if srv is not None:
            srv.upgraded = len(self.sessions)
            if srv.on_count_change is not None:
                srv.on_count_change(len(srv.conns) + srv.upgraded, None)

    def tick(self) -> None:
        """Once a second: ping sessions whose last pong is ping_interval old, close those that did not answer
        within ping_timeout; while draining, close the ones with nothing in flight (1001)."""
        self.now = now = time.monotonic()
        every, wait = self.wsc["ping_interval"], self.wsc["ping_timeout"]
        for s in list(self.sessions):
            if s.closed:
                continue
            if self.draining and not s.inflight:
                s.close(GOING_AWAY, "server shutting down")
            elif s.ping_sent and now - s.ping_sent > wait:
                self.stats["ws_closed_dead"] += 1
                s.close(GOING_AWAY, "no pong within the ping timeout")
            elif not s.ping_sent and every and now - s.last_pong > every:
                s.ping()  # (however busy the peer is sending: a peer that does not read never pongs)

    def drain(self) -> None:
        self.draining = True
        self.tick()

    def close_all(self, reason: str = "server shutting down") -> None:
        for s in list(self.sessions):
            s.close(GOING_AWAY, reason)


def message(rid, **fields) -> bytes:
    """A reply: {"id": rid, ...} as JSON bytes."""
    return orjson.dumps({"id": rid, **fields})
