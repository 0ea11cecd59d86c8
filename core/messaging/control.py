"""The admin control socket: where it lives, how it is secured, and a blocking client for it.

Default: ipc:// inside run_dir, a 0700 directory, with the socket file chmod 0600, so only the
daemon's user can reach it. tcp:// is accepted only with CURVE: the server's key pair plus a list
of allowed client public keys, checked by a ZAP authenticator.
"""
from __future__ import annotations

import os

import zmq

from tidegate.core.messaging import endpoints
from tidegate.core.messaging import protocol


class NoDaemon(RuntimeError):
    """Nothing answers on the control endpoint."""


def ensure_run_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def bind_server(ctx: zmq.Context, cfg: dict):
    """Bind the supervisor's ROUTER control socket; returns (socket, authenticator or None)."""
    ctl = cfg["control"]
    endpoint = endpoints.control(cfg)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.MAXMSGSIZE, ctl["max_message_bytes"])
    sock.setsockopt(zmq.LINGER, 0)
    auth = None
    if endpoint.startswith("tcp://"):
        from zmq.auth.thread import ThreadAuthenticator
        allowed = {k.encode() for k in ctl["curve_client_keys"]}
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=_AllowList(allowed))
        sock.curve_server = True
        sock.curve_secretkey = ctl["curve_secret_key"].encode()
        sock.curve_publickey = ctl["curve_public_key"].encode()
    else:
        path = endpoint[len("ipc://"):]
        if os.path.exists(path):
            os.unlink(path)  # stale: the caller has checked that no daemon is running
    sock.bind(endpoint)
    if endpoint.startswith("ipc://"):
        os.chmod(endpoint[len("ipc://"):], 0o600)
    return sock, auth


class _AllowList:
    def __init__(self, keys: set[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return zmq.utils.z85.encode(key) in self.keys if len(key) == 32 else key in self.keys


def call(cfg: dict, op: str, timeout: float = 5.0, **fields) -> dict:
    """Send one control request and wait for the answer; NoDaemon if nobody is there."""
    ctl = cfg["control"]
    endpoint = endpoints.control(cfg)
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[len("ipc://"):]):
        raise NoDaemon(f"no tidegate daemon is running (no control socket at {endpoint[6:]})")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, ctl["max_message_bytes"])
        sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
        if endpoint.startswith("tcp://"):
            if not (ctl["client_public_key"] and ctl["client_secret_key"]):
                raise NoDaemon("control endpoint is tcp:// but control.client_public_key/client_secret_key are not set")
            sock.curve_serverkey = ctl["curve_public_key"].encode()
            sock.curve_publickey = ctl["client_public_key"].encode()
            sock.curve_secretkey = ctl["client_secret_key"].encode()
        sock.connect(endpoint)
        sock.send(protocol.encode({"op": op, **fields}))
        try:
            return protocol.decode(sock.recv())
        except zmq.Again:
            raise NoDaemon(f"no answer from the tidegate daemon at {endpoint} within {timeout:g} s") from None
    finally:
        sock.close(0)
        ctx.term()
