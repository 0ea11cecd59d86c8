"""Accept control: whether an ingress worker takes new connections, and how many it holds.

The listening sockets are inherited from the supervisor (one SO_REUSEPORT socket per slot and
address, kept open there so a replaced worker's backlog is never dropped). Accepting pauses for
four reasons, each a flag here, and `resume_accepting()` is the one way back: the connection cap
is reached with every connection busy, the supervisor's box-level overload says so, a reload's
release, and a drain (for good). While paused, new connections wait in the kernel backlog.
"""
from __future__ import annotations

import asyncio
import os
import socket

from tidegate.core.base.jsonlog import log
from tidegate.core.runtime.process import connection_cap, open_fds
from tidegate.ext.httpconn import HttpConnection


class Acceptor:
    def __init__(self, srv: dict, http, loop):
        self.srv, self.http, self.loop = srv, http, loop
        self.listen_socks: list[socket.socket] = []
        self.servers: list = []
        self.accepting = False
        self.held_by_box = False  # the supervisor's box-level overload pauses accepting
        self.released = False     # a reload's release (until a resume)
        self.closed = False       # draining: the listening sockets are closed for good
        self.cap = http.max_connections = srv["max_connections"]
        self.fds_own = None  # descriptors held besides connections (fd_cap)
        http.on_count_change = self.on_count_change

    async def start(self, fds: list[int]) -> None:
        self.listen_socks = [socket.socket(fileno=fd) for fd in fds]
        self.fd_cap()
        started = self.resume_accepting()
        if started is not None:
            await started

    def resume_accepting(self):
        """Accept again unless something still holds it paused; the flag is set at once, so a
        second call before the servers exist does not start a second set. Returns the task
        that opens them (None when nothing changed)."""
        if self.accepting or self.closed or self.released or self.held_by_box:
            return None
        self.accepting = True
        return asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        # each server gets a dup of the inherited socket, so closing it (to pause) leaves ours open
        for s in self.listen_socks:
            dup = socket.socket(fileno=os.dup(s.fileno()))
            server = await self.loop.create_server(lambda: HttpConnection(self.http), sock=dup,
                                                   backlog=self.srv["backlog"])
            if not self.accepting:  # paused while this one was being made
                server.close()
                continue
            self.servers.append(server)

    def pause(self) -> None:
        self.accepting = False
        for server in self.servers:
            server.close()
        self.servers = []

    def release(self) -> None:
        self.released = True
        self.pause()

    def resume(self) -> None:
        self.released = False
        self.resume_accepting()

    def box(self, hold: bool) -> None:
        """The supervisor's box-level action `accept`: on pauses, off resumes (if room)."""
        self.held_by_box = hold
        if hold:
            self.pause()
        elif len(self.http.conns) + self.http.upgraded < self.cap:
            self.resume_accepting()

    def close(self) -> None:
        """Draining: stop for good; the port now refuses instead of queueing."""
        self.closed = True
        self.pause()
        for s in self.listen_socks:  # the last copies
            s.close()

    def fd_cap(self) -> None:
        """The connection cap: max_connections, or less where the open-files limit is nearer.
        What the worker holds besides its connections (sockets, stores, pipes: nearly constant)
        is counted again only while it has few connections: listing /proc/self/fd costs about
        1 ms a thousand descriptors, a stall of 19 ms at 18,000 (fd_reserve covers the drift)."""
        conns = len(self.http.conns) + self.http.upgraded
        if self.fds_own is None or conns < 2000:
            fds = open_fds()
            self.fds_own = None if fds is None else fds - conns
        cap = connection_cap(self.srv["max_connections"], self.fds_own, self.srv["fd_reserve"])
        if cap < self.srv["max_connections"] == self.cap:
            log.info("connection cap set by the open-files limit", cap=cap, own_files=self.fds_own,
                     max_connections=self.srv["max_connections"])
        self.cap = self.http.max_connections = cap

    def on_count_change(self, n: int, new) -> None:
        """Over the connection cap (max_connections, or the open-files limit's) a new connection
        evicts an idle or slow one (so a normal client still gets in during a slowloris); only
        when every connection is busy does accepting pause: new ones wait in the backlog."""
        limit = self.cap
        if new is None or n < limit:
            if not self.accepting and n <= limit * 9 // 10 and not (self.closed or self.released or self.held_by_box):
                log.info("accepting again", open=n)
                self.resume_accepting()
            return
        if n == limit and self.http.evictable(new):
            return  # full, but the next connection can take an idle or slow one's place
        if n > limit and self.http.evict(new, max(1, limit // 20)):  # a batch: the next ones find room at once
            return
        if self.accepting:  # every connection is busy: new ones wait in the kernel backlog
            log.warning("connection cap reached; not accepting", open=n, cap=limit)
            self.pause()
