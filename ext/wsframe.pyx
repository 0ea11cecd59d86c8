# cython: language_level=3
"""WebSocket frames from a client (RFC 6455 5.2), parsed in C: the receive path's hot loop.

Profiling the message round trip showed wsproto's frame parsing (a generator and a bytearray
buffer per frame, unmasking a byte at a time) was over half the server's time per message, so
the uncompressed path parses here. wsproto stays the reference: tests/unit/http/test_wsframe.py
feeds the same byte streams (valid, malformed, fuzzed, split at random) to both and requires the
same messages, control frames and close codes. Compressed sockets (permessage-deflate) still use
wsproto whole (core/http/wscodec.py).

FrameReader.feed(data) returns the frames completed so far as tuples:

    (1 or 2, fin, payload)  a text or binary frame; a continuation reports its message's opcode
    (9 or 10, True, payload)  ping, pong
    (8, code, reason)       close (1005 when it carried no code); nothing is parsed after it
    (-1, code, reason)      a protocol violation: the socket must close with that code

Checks, in wsproto's order: the opcode, a fragmented control frame, a control payload over 125
bytes, the length's minimal encoding and top bit, reserved bits, the client's mask, then the
message sequence (a continuation with nothing started, a new message inside a fragmented one).
A frame longer than `max_payload` is refused from its header (1009), before any of it is
buffered. UTF-8 of text is checked by the caller once the message is whole.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    PROTOCOL_ERROR = 1002
    TOO_BIG = 1009
    BAD_DATA = 1007
ERROR = -1
# close codes a peer may send (wsproto's CloseReason less the local-only 1005, 1006, 1015)
cdef frozenset SENDABLE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))


cdef inline void _unmask(uint8_t* dst, const uint8_t* src, Py_ssize_t n, const uint8_t* key) noexcept nogil:
    """dst = src XOR the 4-byte key repeated, eight bytes at a time."""
    cdef uint32_t k32
    cdef uint64_t k64, w
    cdef Py_ssize_t i = 0
    memcpy(&k32, key, 4)
    k64 = (<uint64_t>k32 << 32) | k32  # (both halves equal: right in either byte order)
    while i + 8 <= n:
        memcpy(&w, src + i, 8)
        w ^= k64
        memcpy(dst + i, &w, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ key[i & 3]
        i += 1


cdef tuple _close(bytes payload):
    """A close frame's (8, code, reason), or (-1, code, why) when the frame is malformed."""
    cdef Py_ssize_t n = len(payload)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(payload)
    if n == 0:
        return (8, 1005, "")
    if n == 1:
        return (ERROR, PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = (p[0] << 8) | p[1]
    if not (3000 <= code <= 4999 or code in SENDABLE):
        return (ERROR, PROTOCOL_ERROR, f"close frame with code {code}, which a peer may not send")
    try:
        return (8, code, payload[2:].decode("utf-8"))
    except UnicodeDecodeError:
        return (ERROR, BAD_DATA, "close reason is not UTF-8")


cdef class FrameReader:
    cdef bytearray pending   # the bytes of a frame not yet complete
    cdef Py_ssize_t max_payload
    cdef int message         # the opcode of the fragmented message in progress (0: none)
    cdef bint done           # a close frame or an error was returned: nothing more is parsed
    cdef Py_ssize_t need     # the pending frame's whole size once its header is known (else 0)

    def __init__(self, Py_ssize_t max_payload):
        self.pending = bytearray()
        self.max_payload = max_payload
        self.message = 0
        self.done = False
        self.need = 0

    @property
    def buffered(self) -> int:
        """Bytes held for a frame still arriving."""
        return len(self.pending)

    def feed(self, data) -> list:
        cdef list out = []
        cdef bytes buf
        cdef Py_ssize_t used
        if self.done:
            return out
        if self.pending:
            self.pending += data
            if len(self.pending) < self.need:  # (a long frame still arriving: do not re-parse it)
                return out
            buf = bytes(self.pending)
        else:
            buf = data if type(data) is bytes else bytes(data)
        used = self._parse(buf, out)
        if self.done or used == len(buf):
            if self.pending:
                self.pending = bytearray()
        else:
            self.pending = bytearray(buf[used:])
        return out

    cdef Py_ssize_t _parse(self, bytes buf, list out) except -1:
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t n = len(buf), pos = 0, hdr, need
        cdef uint64_t ln
        cdef int b0, b1, op
        cdef bint fin, control
        cdef bytes payload
        self.need = 0
        while not self.done and n - pos >= 2:
            b0, b1 = p[pos], p[pos + 1]
            fin, op = (b0 & 0x80) != 0, b0 & 0x0F
            if op not in (0, 1, 2, 8, 9, 10):
                return self._fail(out, PROTOCOL_ERROR, f"invalid opcode {op:#x}", pos)
            control = op >= 8
            if control and not fin:
                return self._fail(out, PROTOCOL_ERROR, "fragmented control frame", pos)
            ln, hdr = b1 & 0x7F, 2
            if control and ln > 125:
                return self._fail(out, PROTOCOL_ERROR, "control frame payload over 125 bytes", pos)
            if ln == 126:
                if n - pos < 4:
                    break
                ln, hdr = (<uint64_t>p[pos + 2] << 8) | p[pos + 3], 4
                if ln < 126:
                    return self._fail(out, PROTOCOL_ERROR, "payload length in 2 bytes where 1 would do", pos)
            elif ln == 127:
                if n - pos < 10:
                    break
                ln, hdr = 0, 10
                for i in range(8):
                    ln = (ln << 8) | p[pos + 2 + i]
                if ln < 65536:
                    return self._fail(out, PROTOCOL_ERROR, "payload length in 8 bytes where 2 would do", pos)
                if ln >> 63:
                    return self._fail(out, PROTOCOL_ERROR, "payload length with its top bit set", pos)
            if b0 & 0x70:
                return self._fail(out, PROTOCOL_ERROR, "reserved bit set with no extension", pos)
            if not b1 & 0x80:
                return self._fail(out, PROTOCOL_ERROR, "client frames must be masked", pos)
            if not control:
                if op == 0 and self.message == 0:
                    return self._fail(out, PROTOCOL_ERROR, "continuation frame with no message started", pos)
                if op != 0 and self.message != 0:
                    return self._fail(out, PROTOCOL_ERROR, "new message inside a fragmented one", pos)
            if ln > <uint64_t>self.max_payload:
                return self._fail(out, TOO_BIG, f"frame larger than {self.max_payload} bytes", pos)
            need = hdr + 4 + <Py_ssize_t>ln
            if n - pos < need:
                self.need = need
                break
            payload = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>ln)
            _unmask(<uint8_t*>PyBytes_AS_STRING(payload), p + pos + hdr + 4, <Py_ssize_t>ln, p + pos + hdr)
            pos += need
            if op == 8:
                frame = _close(payload)
                out.append(frame)
                self.done = True
                return n
            if not control:
                if op == 0:
                    op = self.message
                self.message = 0 if fin else op
            out.append((op, fin, payload))
        return pos

    cdef Py_ssize_t _fail(self, list out, int code, str why, Py_ssize_t pos) except -1:
        out.append((ERROR, code, why))
        self.done = True
        return pos
