"""ext/wsframe.pyx against wsproto: the same client byte streams (valid, malformed, fuzzed, split
at random) must give the same messages, control frames and close codes from both."""
from __future__ import annotations

import codecs
import os
import random

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from tidegate.core.http.wscodec import FrameCodec, close_payload, frame
from tidegate.ext.wsframe import FrameReader

BIG = 1 << 24


def masked(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bool = True, length=None) -> bytes:
    """A client frame; `length` forces an encoding of the length (to make non-minimal ones)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    m = 0x80 if mask else 0
    enc = length or (7 if n < 126 else 16 if n < 65536 else 64)
    if enc == 7:
        head += bytes([m | n])
    elif enc == 16:
        head += bytes([m | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([m | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def via_wsproto(stream: bytes, cuts: list[int]) -> list:
    """wsproto's server side: whole messages, control frames, then a close or the error's code."""
    ws = Connection(ConnectionType.SERVER)
    out, parts = [], []
    for chunk in split(stream, cuts):
        ws.receive_data(chunk)
        for ev in ws.events():
            if isinstance(ev, (TextMessage, BytesMessage)):
                parts.append(ev.data.encode() if isinstance(ev, TextMessage) else bytes(ev.data))
                if ev.message_finished:
                    out.append(("msg", 1 if isinstance(ev, TextMessage) else 2, b"".join(parts)))
                    parts = []
            elif isinstance(ev, Ping):
                out.append(("ping", bytes(ev.payload)))
            elif isinstance(ev, Pong):
                out.append(("pong", bytes(ev.payload)))
            elif isinstance(ev, CloseConnection):
                peer = ws.state.name in ("REMOTE_CLOSING", "CLOSED")  # (else: a parse failure)
                out.append(("close", int(ev.code), ev.reason or "") if peer else ("error", int(ev.code)))
                return out
    return out


def via_reader(stream: bytes, cuts: list[int], seen: dict | None = None) -> list:
    """The same from FrameReader, text checked as UTF-8 fragment by fragment (as WsSession does)."""
    r = FrameReader(BIG)
    if seen is not None:
        seen["reader"] = r
    out, parts = [], []
    utf8 = codecs.getincrementaldecoder("utf-8")()
    for chunk in split(stream, cuts):
        for ev in r.feed(chunk):
            op = ev[0]
            if op in (1, 2):
                parts.append(ev[2])
                if op == 1:
                    try:
                        utf8.decode(ev[2], ev[1])
                    except UnicodeDecodeError:
                        out.append(("error", 1007))
                        return out
                if ev[1]:
                    out.append(("msg", op, b"".join(parts)))
                    parts = []
            elif op == 9:
                out.append(("ping", ev[2]))
            elif op == 10:
                out.append(("pong", ev[2]))
            elif op == 8:
                out.append(("close", ev[1], ev[2]))
                return out
            else:
                out.append(("error", ev[1]))
                return out
    return out


def split(stream: bytes, cuts: list[int]):
    prev = 0
    for c in sorted(cuts) + [len(stream)]:
        yield stream[prev:c]
        prev = c


def cuts_for(rng: random.Random, stream: bytes) -> list[int]:
    return rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 12))) if len(stream) > 1 else []


def valid_stream(rng: random.Random) -> bytes:
    out = b""
    for _ in range(rng.randint(1, 8)):
        size = rng.choice([0, 1, 5, 125, 126, 127, 1000, 65535, 65536, 70000])
        op = rng.choice([1, 2])
        data = ("é" * size).encode()[:size] if op == 1 else os.urandom(size)
        if op == 1:
            data = data.decode("utf-8", "ignore").encode()
        pieces = rng.randint(1, 3)
        step = max(1, len(data) // pieces)
        chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
        for i, c in enumerate(chunks):
            out += masked(op if i == 0 else 0, c, fin=i == len(chunks) - 1)
            if rng.random() < 0.3:  # a control frame between fragments
                out += masked(rng.choice([9, 10]), os.urandom(rng.randint(0, 125)))
    if rng.random() < 0.7:
        out += masked(8, close_payload(rng.choice([1000, 1001, 3000, 4999, 1005]), "bye"))
    return out


@pytest.mark.parametrize("seed", range(60))
def test_valid_streams_read_alike(seed):
    rng = random.Random(seed)
    stream = valid_stream(rng)
    cuts = cuts_for(rng, stream)
    expected = via_wsproto(stream, cuts)
    assert expected and all(e[0] != "error" for e in expected)
    assert via_reader(stream, cuts) == expected


MALFORMED = {
    "rsv1 without an extension": masked(1, b"hi", rsv=0x40),
    "rsv3": masked(2, b"hi", rsv=0x10),
    "opcode 3": masked(3, b"hi"),
    "opcode 0xB": masked(0xB, b""),
    "unmasked": masked(1, b"hi", mask=False),
    "fragmented ping": masked(9, b"p", fin=False),
    "ping over 125": masked(9, b"x" * 126),
    "close over 125": masked(8, b"\x03\xe8" + b"x" * 124),
    "16-bit length for 5 bytes": masked(1, b"hello", length=16),
    "64-bit length for 300 bytes": masked(2, b"x" * 300, length=64),
    "64-bit length with the top bit": b"\x82\xff" + (1 << 63 | 70000).to_bytes(8, "big") + b"abcd",
    "continuation first": masked(0, b"x"),
    "text inside a fragmented text": masked(1, b"a", fin=False) + masked(1, b"b"),
    "binary inside a fragmented text": masked(1, b"a", fin=False) + masked(2, b"b"),
    "close with 1 byte": masked(8, b"\x03"),
    "close code 999": masked(8, (999).to_bytes(2, "big")),
    "close code 1005": masked(8, (1005).to_bytes(2, "big")),
    "close code 1006": masked(8, (1006).to_bytes(2, "big")),
    "close code 1004": masked(8, (1004).to_bytes(2, "big")),
    "close code 2999": masked(8, (2999).to_bytes(2, "big")),
    "close code 5000": masked(8, (5000).to_bytes(2, "big")),
    "close reason not UTF-8": masked(8, b"\x03\xe8\xff\xfe"),
    "text not UTF-8": masked(1, b"\xff\xfe"),
    "fragmented text not UTF-8": masked(1, b"ok", fin=False) + masked(0, b"\xc3"),
    "good then bad": masked(1, b"fine") + masked(9, b"p") + masked(3, b""),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frames_fail_alike(name):
    stream = MALFORMED[name]
    for seed in range(5):
        cuts = cuts_for(random.Random(seed), stream) if seed else []
        expected = via_wsproto(stream, cuts)
        assert expected and expected[-1][0] == "error", expected
        assert via_reader(stream, cuts) == expected


@pytest.mark.parametrize("group", range(6))
def test_fuzzed_streams_agree(group):
    """Valid streams with bytes flipped, cut or repeated: wherever wsproto reaches a message, a
    control frame, a close or an error, the reader reaches the same."""
    for seed in range(group * 50, group * 50 + 50):
        fuzz_once(random.Random(1000 + seed))


def fuzz_once(rng: random.Random) -> None:
    stream = bytearray(valid_stream(rng))
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(stream))
        action = rng.random()
        if action < 0.6:
            stream[i] ^= 1 << rng.randrange(8)
        elif action < 0.8:
            del stream[i:i + rng.randint(1, 8)]
        else:
            stream[i:i] = stream[i:i + rng.randint(1, 8)]
    stream = bytes(stream)
    cuts = cuts_for(rng, stream)
    seen = {}
    expected, got = via_wsproto(stream, cuts), via_reader(stream, cuts, seen)
    if got != expected:
        # wsproto checks a frame's UTF-8 as its bytes arrive, the reader once the frame is
        # whole: where that is the only difference, the reader is still waiting for the rest
        # of that frame.
        assert expected and expected[-1][0] == "error", (expected, got)
        assert got[:len(expected) - 1] == expected[:-1], (expected, got)
        if len(got) < len(expected):
            assert seen["reader"].buffered > 0, (expected, got)
        else:
            assert got[len(expected) - 1] == expected[-1], (expected, got)


def test_a_frame_over_the_limit_is_refused_from_its_header():
    r = FrameReader(1000)
    head = masked(2, b"x" * 5000)[:8]  # (header and mask only: the payload never has to arrive)
    assert r.feed(head) == [(-1, 1009, "frame larger than 1000 bytes")]
    assert r.buffered == 0 and r.feed(b"more") == []


def test_a_long_frame_arriving_in_pieces_is_read_once_whole():
    r = FrameReader(BIG)
    data = os.urandom(300_000)
    stream = masked(2, data) + masked(9, b"p")
    got = []
    for i in range(0, len(stream), 4096):
        got += r.feed(stream[i:i + 4096])
    assert got == [(2, True, data), (9, True, b"p")]
    assert r.buffered == 0


def test_server_frames_read_back_through_wsproto():
    """frame() builds what a wsproto client reads: text, ping, pong and close."""
    client = Connection(ConnectionType.CLIENT)
    codec = FrameCodec(BIG)
    big = "x" * 70000
    client.receive_data(codec.text(b'{"a":1}') + codec.text(big.encode()) + codec.ping(b"tg") + codec.pong(b"")
                        + codec.close(1008, "too many"))
    events = list(client.events())
    assert [type(e).__name__ for e in events] == ["TextMessage", "TextMessage", "Ping", "Pong", "CloseConnection"]
    assert events[0].data == '{"a":1}' and events[1].data == big and events[2].payload == b"tg"
    assert (events[4].code, events[4].reason) == (1008, "too many")
    assert frame(1, b"") == b"\x81\x00"
