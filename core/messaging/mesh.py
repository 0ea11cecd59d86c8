"""The ingress workers' actor mesh: ask the owner of a key, get its answer back.

Every worker binds one ROUTER socket (`ipc://RUN_DIR/peer-SLOT.sock`) for requests to the keys it
owns and connects one DEALER to every peer for its own questions. The owner of a key (found on
the ring) is the only process that touches that key's state, so no locks are needed anywhere.

A single ZeroMQ round trip costs ~300 us, so messages are never sent one by one: everything
queued for a peer during one event-loop turn goes out as one frame (an orjson list), and the
owner answers a frame with one frame. Each request carries a correlation id and an absolute
deadline (CLOCK_MONOTONIC is shared by all processes on the host); the owner skips requests
whose deadline has passed, and the asker's future times out, so a dead or slow owner turns
into a clear error for the client, never a hung request. A key the asker owns itself is a
direct function call, not a message.

Frames: request  [[id, op, deadline, payload], ...]   reply  [[id, ok, result], ...]
"""
from __future__ import annotations

import asyncio
import itertools
import time

import orjson
import zmq

from tidegate.core.base.jsonlog import log
from tidegate.core.messaging import endpoints
from tidegate.core.messaging.protocol import pack
from tidegate.core.messaging.zmqfd import waiting


class OwnerUnavailable(Exception):
    """The owner did not answer by the deadline (dead, respawning or overloaded)."""


class RemoteError(Exception):
    """The owner's handler raised; the message says what."""


def _settle(fut: asyncio.Future, ok: bool, result) -> None:
    if not fut.done():
        if ok:
            fut.set_result(result)
        else:
            fut.set_exception(result)


class Mesh:
    HOLD_S = 0.002  # longest a message waits behind an unanswered frame
    SWEEP_S = 0.01  # deadline check period: a call fails at most this late
    def __init__(self, slot: int, n_slots: int, run_dir: str, handlers: dict, max_message_bytes: int,
                 hwm: int = 10000, ctx: zmq.Context | None = None, gen: int = 1, bind: bool = True):
        """bind=False (with slot -1): a mesh that only asks, of every slot of generation gen: how a
        worker that handed its stores to the next generation forwards what still comes its way."""
        self.slot, self.n_slots, self.handlers = slot, n_slots, handlers
        self.max_frame = max_message_bytes
        self.closed = False
        # the worker passes its one context: every extra context is one more ZeroMQ I/O thread
        # competing for the cores, and a send waits whenever its I/O thread is not running
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.router = None
        if bind:
            self.router = self.ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
            self.router.setsockopt(zmq.SNDHWM, hwm)
            self.router.setsockopt(zmq.RCVHWM, hwm)
            self.router.bind(endpoints.peer(run_dir, slot, gen))
        self.dealers: dict[int, zmq.Socket] = {}
        for peer in range(n_slots):
            if peer != slot:
                d = self.ctx.socket(zmq.DEALER)
                d.setsockopt(zmq.LINGER, 0)
                d.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
                d.setsockopt(zmq.SNDHWM, hwm)
                d.setsockopt(zmq.RCVHWM, hwm)
                d.connect(endpoints.peer(run_dir, peer, gen))
                self.dealers[peer] = d
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._outbox: dict[int, list] = {}
        self._flush_scheduled = False
        self._inflight: dict[int, object] = {}  # peer -> hold timer while a frame awaits its reply
        self.loop = None
        self._heard: dict[int, float] = {}  # peer -> when a reply frame last came from it
        self.stats = {"frames_out": 0, "messages_out": 0, "frames_in": 0, "expired": 0}
        self.pending = 0  # calls handled here whose answer is not sent yet (a drain waits for them)

    def counters(self) -> dict:
        st = self.stats
        return {"mesh_frames_sent": st["frames_out"], "mesh_messages_sent": st["messages_out"],
                "mesh_expired": st["expired"]}

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.router is not None:
            self.loop.add_reader(self.router.getsockopt(zmq.FD), self._on_router)
        for peer, d in self.dealers.items():
            self.loop.add_reader(d.getsockopt(zmq.FD), self._on_dealer, d, peer)
        self.loop.call_later(self.SWEEP_S, self._sweep)

    # ---- asking -------------------------------------------------------------------------------
    def request(self, owner: int, op: str, payload, timeout: float = 0.5) -> asyncio.Future:
        """Queue a call to another worker; the future gets the result, RemoteError or
        OwnerUnavailable. No coroutine and no Task per call: on the request path those cost
        more than the rest of the hop."""
        fut = self.loop.create_future()
        self.request_cb(owner, op, payload, timeout, lambda ok, result: _settle(fut, ok, result))
        return fut

    def request_cb(self, owner: int, op: str, payload, timeout: float, callback) -> None:
        """Like request(), with callback(ok, result_or_exception) instead of a future."""
        rid = next(self._ids)
        deadline = time.monotonic() + timeout
        self._waiting[rid] = (callback, deadline, owner, op, timeout)
        self._outbox.setdefault(owner, []).append([rid, op, deadline, payload])
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def silent_for(self, peer: int) -> float:
        """Seconds since peer last answered (inf when it never has)."""
        heard = self._heard.get(peer)
        return time.monotonic() - heard if heard is not None else float("inf")

    def _sweep(self) -> None:
        """Fail the calls whose deadline has passed: one timer for all of them (a timer per call
        costs more than the hop's own bookkeeping)."""
        now = time.monotonic()
        expired = [rid for rid, entry in self._waiting.items() if entry[1] <= now]
        for rid in expired:
            callback, _, owner, op, timeout = self._waiting.pop(rid)
            callback(False, OwnerUnavailable(f"worker {owner} did not answer {op!r} within {timeout * 1000:.0f} ms"))
        if not self.closed:
            self.loop.call_later(self.SWEEP_S, self._sweep)

    def _flush(self) -> None:
        """Send what this loop turn queued: one frame per peer, and at most one frame in flight
        per peer. While a frame awaits its reply, newer messages wait and leave together when it
        comes back (Nagle's idea for RPC): an idle mesh sends at once, a busy one sends fewer,
        fuller frames, and every send costs a wake-up of ZeroMQ's I/O thread on both sides."""
        self._flush_scheduled = False
        if self.closed:  # closed after this flush was scheduled
            return
        for peer in [p for p in self._outbox if p not in self._inflight]:
            self._send_frame(peer)

    def _send_frame(self, peer: int) -> None:
        msgs = self._outbox.pop(peer, None)
        if not msgs:
            return
        frames, too_big = pack(msgs, self.max_frame)
        for m in too_big:
            entry = self._waiting.pop(m[0], None)
            if entry is not None:
                entry[0](False, RemoteError(f"{m[1]!r} larger than server.max_frame_bytes ({self.max_frame})"))
        try:
            for frame in frames:
                self.dealers[peer].send(frame, zmq.NOBLOCK)
                self.stats["frames_out"] += 1
            self.stats["messages_out"] += len(msgs) - len(too_big)
        except zmq.Again:
            pass  # peer backed up past HWM: the callers time out with OwnerUnavailable
        # hold later messages until the reply, but never longer than HOLD_S (a lost frame)
        self._inflight[peer] = self.loop.call_later(self.HOLD_S, self._release, peer)
        self.loop.call_soon(self._on_dealer, self.dealers[peer], peer)  # a send can eat the fd's edge

    def _release(self, peer: int) -> None:
        timer = self._inflight.pop(peer, None)
        if timer is not None:
            timer.cancel()
        if peer in self._outbox:
            self._send_frame(peer)

    def _on_dealer(self, sock, peer: int) -> None:
        got = False
        for frame in waiting(sock):
            got = True
            try:
                replies = orjson.loads(frame)
            except orjson.JSONDecodeError:
                continue
            for rid, ok, result in replies:
                entry = self._waiting.pop(rid, None)
                if entry is not None:
                    entry[0](ok, result if ok else RemoteError(result))
        if got:
            self._heard[peer] = time.monotonic()
            self._release(peer)  # the frame in flight is answered: send what waited

    # ---- owning -------------------------------------------------------------------------------
    def _on_router(self) -> None:
        sock = self.router
        for frames in waiting(sock, multipart=True):
            try:
                ident, frame = frames
                msgs = orjson.loads(frame)
            except (ValueError, orjson.JSONDecodeError):
                continue
            self.stats["frames_in"] += 1
            now, replies = time.monotonic(), []
            for rid, op, deadline, payload in msgs:
                if deadline < now:
                    self.stats["expired"] += 1  # the asker has given up: do not do the work
                    continue
                handler = self.handlers.get(op)
                try:
                    if handler is None:
                        raise KeyError(f"unknown op {op!r}")
                    result = handler(payload)
                    if isinstance(result, asyncio.Future):  # answered when it resolves (e.g. after an fsync)
                        self.pending += 1
                        result.add_done_callback(lambda f, rid=rid, ident=ident: self._reply_later(ident, rid, f))
                        continue
                    replies.append([rid, True, result])
                except Exception as e:
                    log.error("mesh handler failed", op=op, error=repr(e))
                    replies.append([rid, False, repr(e)])
            if replies:
                self._send_replies(ident, replies)
        # ROUTER sends can consume the edge too
        if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.loop.call_soon(self._on_router)

    def _reply_later(self, ident: bytes, rid, fut) -> None:
        self.pending -= 1
        err = fut.exception()
        reply = [rid, False, repr(err)] if err is not None else [rid, True, fut.result()]
        if not self._send_replies(ident, [reply]):
            return
        if self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # the send may have eaten the fd's edge
            self.loop.call_soon(self._on_router)

    def _send_replies(self, ident: bytes, replies: list) -> bool:
        frames, too_big = pack(replies, self.max_frame)
        frames += pack([[r[0], False, f"answer larger than server.max_frame_bytes ({self.max_frame})"]
                        for r in too_big], self.max_frame)[0]
        try:
            for frame in frames:
                self.router.send_multipart([ident, frame], zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError):
            return False
        return True

    def close(self) -> None:
        self.closed = True
        socks = list(self.dealers.values()) + ([self.router] if self.router is not None else [])
        if self.loop:
            for s in socks:
                self.loop.remove_reader(s.getsockopt(zmq.FD))
        for s in socks:
            s.close(0)
        if self._own_ctx:
            self.ctx.term()
