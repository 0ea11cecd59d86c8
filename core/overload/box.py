"""Box-level overload, Envoy overload-manager style: resource pressure triggers graded actions.

Two resources: memory (the RSS of every process of the daemon against `overload.memory_limit`,
the machine's memory when 0) and file descriptors (each ingress worker's open fds against its
RLIMIT_NOFILE; the fullest counts). At the share set for it in `overload.box_actions`, an action
is on for every ingress worker:

  keepalive  close each connection after its answer (idle keep-alives are closed too)
  trim       (memory only) drop what can be rebuilt: the ingress workers' exact-cache entries and
             rate-limit plans, the inference workers' prefix RAM tiers (BOX goes to both kinds)
  shed       shed every class but critical at the door (a `never` class is rejected)
  accept     stop accepting new connections (they wait in the kernel backlog)

An action turns off again once the share is 0.02 below its threshold, so a share that hovers at a
threshold does not flap. Pure logic; the supervisor measures and tells the ingress workers.
"""
from __future__ import annotations

import os

import psutil

HYSTERESIS = 0.02
ACTIONS = ("keepalive", "trim", "shed", "accept")
MEMORY_ONLY = ("trim",)  # an fd shortage is not helped by dropping memory


class BoxWatch:
    def __init__(self, ov: dict):
        self.active: set[str] = set()
        self.memory_share = self.fd_share = 0.0
        self.configure(ov)

    def configure(self, ov: dict) -> None:
        """(Re)read [overload] (a reload); what is active stays until the next measurement."""
        self.limit = ov["memory_limit"] or psutil.virtual_memory().total
        self.thresholds = dict(ov["box_actions"])

    def update(self, rss_bytes: int, fd_share: float) -> bool:
        """Take a measurement; True when the set of active actions changed."""
        self.memory_share, self.fd_share = rss_bytes / self.limit, fd_share
        both = max(self.memory_share, fd_share)
        now = set()
        for a, t in self.thresholds.items():
            share = self.memory_share if a in MEMORY_ONLY else both
            if share >= t or (a in self.active and share >= t - HYSTERESIS):
                now.add(a)
        changed, self.active = now != self.active, now
        return changed

    def describe(self) -> dict:
        return {"actions": sorted(self.active), "memory_share": round(self.memory_share, 4),
                "fd_share": round(self.fd_share, 4), "memory_limit": self.limit, "thresholds": self.thresholds}


def measure(pids: list[int], fd_pids: list[int]) -> tuple[int, float]:
    """(RSS of pids and this process, the highest open-fd share of fd_pids); a process that is
    gone counts as nothing."""
    rss = 0
    for pid in [os.getpid(), *pids]:
        try:
            rss += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    fd = 0.0
    for pid in fd_pids:
        try:
            p = psutil.Process(pid)
            soft = p.rlimit(psutil.RLIMIT_NOFILE)[0]
            if soft > 0:
                fd = max(fd, p.num_fds() / soft)
        except psutil.Error:
            pass
    return rss, fd
