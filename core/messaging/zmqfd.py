"""Reading ZeroMQ sockets from an asyncio loop through their file descriptor.

The ZMQ fd is edge-triggered and only means "look at ZMQ_EVENTS": a wake-up must drain every
waiting message, and a send on the same socket can consume the edge, so senders schedule a
drain too. Both the supervisor link and the mesh read this way.
"""
from __future__ import annotations

import orjson
import zmq


def waiting(sock: zmq.Socket, multipart: bool = False):
    """Yield every message waiting on sock now (frames list when multipart)."""
    while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
        try:
            yield sock.recv_multipart(zmq.NOBLOCK) if multipart else sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def decoded(sock: zmq.Socket, decode=orjson.loads, errors=(orjson.JSONDecodeError,)):
    """Every message waiting on sock, decoded; a frame that does not decode is dropped. Nothing
    once the socket is closed (a callback queued before close())."""
    if sock.closed:
        return
    for frame in waiting(sock):
        try:
            yield decode(frame)
        except errors:
            continue
