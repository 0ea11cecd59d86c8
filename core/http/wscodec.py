"""WebSocket codecs: bytes in, frames out, and the server's frames built. One interface, two
implementations, chosen per socket at the upgrade:

    FrameCodec    ext/wsframe.pyx (C) parses; frames are built here. The default.
    WsprotoCodec  wsproto whole, for sockets that negotiated permessage-deflate.

receive(data) returns a list of events, the same tuples from either (see ext/wsframe.pyx):
(1 or 2, fin, payload bytes), (9 or 10, True, payload), (8, code, reason), (-1, code, why).
text(payload), ping(payload), pong(payload) and close(code, reason) return the bytes to write.
"""
from __future__ import annotations

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from tidegate.ext.wsframe import FrameReader

TEXT, BINARY, CLOSE, PING, PONG, ERROR = 1, 2, 8, 9, 10, -1
NO_STATUS = 1005  # a close frame with no code (answered with none)


def frame(opcode: int, payload: bytes) -> bytes:
    """One unfragmented, unmasked frame from the server (RFC 6455 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def close_payload(code: int, reason: str) -> bytes:
    if code == NO_STATUS:
        return b""
    return code.to_bytes(2, "big") + reason.encode()[:123]  # (a control payload is at most 125 bytes)


class FrameCodec:
    __slots__ = ("reader",)

    def __init__(self, max_payload: int):
        self.reader = FrameReader(max_payload)

    def receive(self, data: bytes) -> list:
        return self.reader.feed(data)

    def text(self, payload: bytes) -> bytes:
        return frame(TEXT, payload)

    def ping(self, payload: bytes) -> bytes:
        return frame(PING, payload)

    def pong(self, payload: bytes) -> bytes:
        return frame(PONG, payload)

    def close(self, code: int, reason: str) -> bytes:
        return frame(CLOSE, close_payload(code, reason))


class WsprotoCodec:
    """permessage-deflate: wsproto inflates, deflates and frames; its events become our tuples
    (a text message's data is encoded back to bytes, so both codecs hand on the same)."""
    __slots__ = ("ws",)

    def __init__(self, extensions: list):
        self.ws = Connection(ConnectionType.SERVER, extensions=extensions)

    def receive(self, data: bytes) -> list:
        out = []
        try:
            self.ws.receive_data(data)
            for ev in self.ws.events():
                if isinstance(ev, Message):
                    payload = ev.data.encode() if isinstance(ev, TextMessage) else bytes(ev.data)
                    out.append((TEXT if isinstance(ev, TextMessage) else BINARY, ev.message_finished, payload))
                elif isinstance(ev, Ping):
                    out.append((PING, True, bytes(ev.payload)))
                elif isinstance(ev, Pong):
                    out.append((PONG, True, bytes(ev.payload)))
                elif isinstance(ev, CloseConnection):
                    # (wsproto reports its parse failures as a CloseConnection too, leaving the
                    # state as it was: only the peer's own close moves it)
                    peer = self.ws.state in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED)
                    out.append((CLOSE if peer else ERROR, int(ev.code), ev.reason or ""))
                    break
        except (RemoteProtocolError, LocalProtocolError) as e:
            out.append((ERROR, int(CloseReason.PROTOCOL_ERROR), str(e)[:100]))
        return out

    def text(self, payload: bytes) -> bytes:
        return self.ws.send(TextMessage(data=payload.decode()))

    def ping(self, payload: bytes) -> bytes:
        return self.ws.send(Ping(payload=payload))

    def pong(self, payload: bytes) -> bytes:
        return self.ws.send(Pong(payload=payload))

    def close(self, code: int, reason: str) -> bytes:
        if self.ws.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return b""
        return self.ws.send(CloseConnection(code=code, reason=reason or None)) if code != NO_STATUS \
            else self.ws.send(CloseConnection(code=code))
