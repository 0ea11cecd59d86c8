"""pytest-benchmark microbenchmarks of the ingress hot path, each beside its baseline.

    python -m pytest bench/test_micro.py --benchmark-enable --benchmark-group-by=group

Baselines: a bare httptools protocol with one callback (the floor any llhttp-based server
pays), and json.loads (the stdlib) next to the orjson + jsonguard path.
"""
import json

import httptools
import orjson
import pytest

from tidegate.core.base import config
from tidegate.core.http.http11 import HttpServer, Response, json_response
from tidegate.core.http.jsonbody import parse_json
from tidegate.core.base.jsonlog import log
from tidegate.core.base.metrics import WorkerMetrics
from tidegate.core.http.router import Router
from tidegate.ext import jsonguard
from tidegate.ext.httpconn import HttpConnection

LIMITS = config.defaults()["limits"]
BODY = b'{"model":"demo","messages":[{"role":"user","content":"How far is the moon?"}],"max_tokens":16}'
GET = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: bench\r\n\r\n"
POST = (b"POST /v1/echo HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
HEALTHZ = Response(200, b'{"status":"ok"}')


class NullTransport:
    def write(self, data):
        pass

    def set_write_buffer_limits(self, high):
        pass


def tidegate_conn():
    r = Router()
    r.add("GET", "/healthz", lambda req: HEALTHZ)
    r.add("POST", "/v1/echo", lambda req: json_response({"object": "echo", "data": parse_json(req, LIMITS)}))
    conn = HttpConnection(HttpServer(LIMITS, r.dispatch, WorkerMetrics(), log, routes=r.exact))
    conn.connection_made(NullTransport())
    return conn


class BareProtocol:
    """The floor: llhttp framing and one write per request, nothing else."""

    def __init__(self):
        self.transport = NullTransport()
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_message_complete(self):
        self.transport.write(b'HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{"status":"ok"}')


@pytest.mark.benchmark(group="request GET /healthz")
def test_get_tidegate(benchmark):
    benchmark(tidegate_conn().data_received, GET)


@pytest.mark.benchmark(group="request GET /healthz")
def test_get_bare_httptools(benchmark):
    benchmark(BareProtocol().data_received, GET)


@pytest.mark.benchmark(group="request POST /v1/echo")
def test_post_tidegate(benchmark):
    benchmark(tidegate_conn().data_received, POST)


@pytest.mark.benchmark(group="json body")
def test_json_guard_and_orjson(benchmark):
    def run():
        jsonguard.scan(BODY, 64, 64)
        return orjson.loads(BODY)
    assert benchmark(run)["max_tokens"] == 16


@pytest.mark.benchmark(group="json body")
def test_json_stdlib(benchmark):
    assert benchmark(json.loads, BODY)["max_tokens"] == 16


def _client_frame(payload: bytes) -> bytes:
    mask = b"\x1f\x2e\x3d\x4c"
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


WS_MESSAGE = _client_frame(b'{"id":1,"type":"echo","body":{"x":"hello"}}')


@pytest.mark.benchmark(group="WebSocket frame in")
def test_ws_frame_tidegate(benchmark):
    """ext/wsframe: one small masked text frame parsed (what WsSession.data_received pays)."""
    from tidegate.core.http.wscodec import FrameCodec
    codec = FrameCodec(1 << 20)
    assert benchmark(codec.receive, WS_MESSAGE)[0][0] == 1


@pytest.mark.benchmark(group="WebSocket frame in")
def test_ws_frame_wsproto(benchmark):
    """The same frame through wsproto's server Connection (receive_data, then its events)."""
    from wsproto.connection import Connection, ConnectionType
    ws = Connection(ConnectionType.SERVER)

    def run():
        ws.receive_data(WS_MESSAGE)
        return list(ws.events())
    assert benchmark(run)[0].data.startswith('{"id":1')
