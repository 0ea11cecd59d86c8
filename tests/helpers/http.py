"""Raw HTTP/1.1 over a socket: exact bytes in, Content-Length framed replies out."""
from __future__ import annotations

import json
import socket


class HttpReply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Reader:
    """Reads Content-Length framed responses (all tidegate sends) from a socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read(self) -> HttpReply:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"connection closed; got {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
        if status == 100:
            return self.read()
        n = int(headers.get("content-length", 0))
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("connection closed mid-body")
        body, self.buf = self.buf[:n], self.buf[n:]
        return HttpReply(status, headers, body)

    def closed(self, timeout: float = 3.0) -> bool:
        """True if the peer closes (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


def request(port: int, method: str = "GET", path: str = "/healthz", body: bytes | None = None,
            headers: dict | None = None, timeout: float = 5.0) -> HttpReply:
    with connect(port, timeout) as s:
        h = {"Host": "t", "Connection": "close", **(headers or {})}
        if body is not None:
            h.setdefault("Content-Type", "application/json")
            h["Content-Length"] = str(len(body))
        raw = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        s.sendall(raw.encode() + (body or b""))
        return Reader(s).read()


def raw_exchange(port: int, data: bytes) -> tuple[HttpReply, bool]:
    """Send raw bytes; return the first reply and whether the server then closed the connection."""
    with connect(port) as s:
        s.sendall(data)
        r = Reader(s)
        reply = r.read()
        return reply, r.closed(timeout=1.0)
