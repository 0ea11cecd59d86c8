"""The WebSocket upgrade's checks and answer (core/http/websocket.handshake), RFC 6455 4.2."""
import pytest

from tidegate.core.base import config
from tidegate.core.http.http11 import HttpError, Request
from tidegate.core.http.websocket import handshake

CFG = config.load(None)["websocket"]


def upgrade(headers=None):
    req = Request()
    req.method = "GET"
    req.headers = {b"upgrade": b"websocket", b"connection": b"keep-alive, Upgrade", b"sec-websocket-version": b"13",
                   b"sec-websocket-key": b"dGhlIHNhbXBsZSBub25jZQ==", **(headers or {})}
    return req


def test_the_rfc_example_key_gets_the_rfc_accept():
    headers, extensions = handshake(upgrade(), CFG)
    assert (b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") in headers and extensions == []


@pytest.mark.parametrize("headers,status", [
    ({b"upgrade": b"h2c"}, 426), ({b"sec-websocket-version": b"8"}, 426),
    ({b"sec-websocket-key": b"short"}, 400), ({b"sec-websocket-key": b"!!not base64!!"}, 400)])
def test_bad_upgrades_are_refused(headers, status):
    with pytest.raises(HttpError) as e:
        handshake(upgrade(headers), CFG)
    assert e.value.status == status


def test_permessage_deflate_only_when_configured_and_offered():
    offer = {b"sec-websocket-extensions": b"permessage-deflate; client_max_window_bits"}
    assert handshake(upgrade(offer), CFG)[1] == []  # off by default
    headers, extensions = handshake(upgrade(offer), dict(CFG, permessage_deflate=True))
    assert len(extensions) == 1 and any(k == b"sec-websocket-extensions" for k, _ in headers)
    assert handshake(upgrade(), dict(CFG, permessage_deflate=True))[1] == []  # not offered


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200000])
def test_text_frames_parse_as_wsproto_reads_them(size):
    """The reply path frames text itself; wsproto's client side must read exactly that message."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import TextMessage

    from tidegate.core.http.wscodec import TEXT, frame
    payload = ("é" * (size // 2) + "x" * (size % 2)).encode()
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(frame(TEXT, payload))
    events = list(client.events())
    assert len(events) >= 1 and all(isinstance(e, TextMessage) for e in events)
    assert "".join(e.data for e in events) == payload.decode() and events[-1].message_finished
