"""Messages between tidegate processes and on the admin control socket.

Every message is one ZeroMQ frame holding an orjson-encoded object with an "op". Requests that
expect an answer carry an "id"; the answer carries the same "id". Sizes are capped on the socket
itself (ZMQ_MAXMSGSIZE), so decode only has to reject what is not a JSON object.
"""
from __future__ import annotations

import orjson

# worker -> supervisor
READY = "ready"          # the worker listens and serves
HEARTBEAT = "hb"         # liveness + metrics snapshot
METRICS = "metrics"      # request: render the aggregated /metrics text (carries a fresh snapshot)
READINESS = "readiness"  # request: are all workers and downstream processes up?
REPLY = "reply"          # supervisor -> worker answer to a request

# admin -> supervisor (control socket)
CONTROL_OPS = ("status", "workers", "config", "reload", "drain", "stop", "metrics", "cache")

# supervisor -> worker, unsolicited
PURGE = "purge"          # drop cached answers (all, or one tenant's)


class ProtocolError(ValueError):
    pass


def encode(msg: dict) -> bytes:
    return orjson.dumps(msg)


def decode(frame: bytes) -> dict:
    try:
        msg = orjson.loads(frame)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("message must be an object with an 'op' string")
    return msg
