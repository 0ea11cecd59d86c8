"""Frames between processes never exceed server.max_frame_bytes (the sockets' ZMQ_MAXMSGSIZE,
past which ZeroMQ drops the whole link); an ERR payload becomes the HTTP error once."""
import orjson

from tidegate.core.messaging import protocol


def test_pack_splits_a_turn_into_frames_that_fit_and_returns_what_cannot():
    msgs = [[i, "op", 0, "x" * 300] for i in range(50)] + [[99, "op", 0, "y" * 5000]]
    frames, too_big = protocol.pack(msgs, 2000)
    assert all(len(f) <= 2000 for f in frames) and [m[0] for m in too_big] == [99]
    assert [m for f in frames for m in orjson.loads(f)] == msgs[:-1]  # everything else, in order
    assert protocol.pack(msgs[:3], 1 << 20) == ([orjson.dumps(msgs[:3])], [])  # one frame when it fits


def test_err_payload_to_http_error():
    e = protocol.http_error([503, "queue full", "queue_full", None])
    assert e.status == 503 and dict(e.headers)[b"retry-after"] == b"1"
    e = protocol.http_error([400, "bad", "invalid_parameter", "logit_bias"])
    assert e.status == 400 and e.body()["error"]["param"] == "logit_bias" and not e.headers
