"""What a load test saw: HDR histograms (hdrhistogram, 3 significant digits) of latency per class,
per second and per phase; counts of each outcome; the server's memory when watched; how long
each class took to settle back after the spike; a PNG of rate and p99 per class over time."""
from __future__ import annotations

from hdrh.histogram import HdrHistogram

from tidegate.core.base.config import CLASSES

OUTCOMES = ("ok", "cached", "rejected", "error", "timeout")
MAX_US = 3_600_000_000


def _hist() -> HdrHistogram:
    return HdrHistogram(1, MAX_US, 3)


def _ms(h: HdrHistogram, q: float) -> float:
    return h.get_value_at_percentile(q) / 1000.0 if h.get_total_count() else 0.0


class Recorder:
    def __init__(self, sc):
        self.sc = sc
        n = int(sc.duration) + 2
        self.classes = [c for c in CLASSES if any(s.cls == c for s in sc.streams)]
        groups = self.classes + [f"stream:{s.name}" for s in sc.streams]  # per class, and per stream
        self.per_second = {g: [_hist() for _ in range(n)] for g in groups}
        self.counts = {g: [dict.fromkeys(OUTCOMES, 0) for _ in range(n)] for g in groups}
        self.cache_kinds: dict[str, dict[str, int]] = {c: {} for c in self.classes}
        self.rss: list[tuple[int, int]] = []
        self.wall = 0.0

    def record(self, stream, t: float, latency: float, outcome: str, cache_kind: str | None = None) -> None:
        """t: the request's scheduled time since the start; latency from then, in seconds."""
        sec = min(int(t), len(self.per_second[stream.cls]) - 1)
        for g in (stream.cls, f"stream:{stream.name}"):
            if outcome != "timeout":
                self.per_second[g][sec].record_value(max(1, min(MAX_US, int(latency * 1e6))))
            self.counts[g][sec][outcome] += 1
        if outcome == "cached" and cache_kind:
            k = self.cache_kinds[stream.cls]
            k[cache_kind] = k.get(cache_kind, 0) + 1

    def memory(self, second: int, rss: int) -> None:
        self.rss.append((second, rss))

    def progress_line(self, sec: int, mult: float, pool) -> str:
        parts = [f"t={sec:4d}s x{mult:.2f} conns {pool.open:5d}"]
        for c in self.classes:
            n = self.counts[c][sec]
            h = self.per_second[c][sec]
            parts.append(f"{c} {sum(n.values()):4d}/s p99 {_ms(h, 99):8.1f} ms ok {n['ok']} cached {n['cached']} "
                         f"rej {n['rejected']} err {n['error']} to {n['timeout']}")
        return " | ".join(parts)

    def window(self, cls: str, lo: float, hi: float) -> dict:
        h = _hist()
        counts = dict.fromkeys(OUTCOMES, 0)
        for sec in range(int(lo), min(int(hi), len(self.per_second[cls]))):
            h.add(self.per_second[cls][sec])
            for k, v in self.counts[cls][sec].items():
                counts[k] += v
        span = max(1e-9, hi - lo)
        return {"requests": sum(counts.values()), **counts, "goodput_per_s": round((counts["ok"]) / span, 2),
                "p50_ms": _ms(h, 50), "p90_ms": _ms(h, 90), "p99_ms": _ms(h, 99), "max_ms": h.get_max_value() / 1000.0}

    def _window_p99(self, cls: str, sec: int, span: int) -> float | None:
        h = _hist()
        for s in range(sec, sec + span):
            h.add(self.per_second[cls][s])
        return _ms(h, 99) if h.get_total_count() else None

    def settle_seconds(self, cls: str, baseline_p99: float, from_t: float, factor: float = 1.25,
                       span: int = 5, before: tuple | None = None) -> float | None:
        """Seconds after from_t until the p99 of every later span-second window is back at baseline:
        within factor x the before phase's p99, or no worse than the worst span-second window of
        the before phase itself (windows, not single seconds: one second holds too few requests
        for a p99, and a window of a sparse stream is as noisy before the spike as after it)."""
        bound = max(baseline_p99 * factor, baseline_p99 + 1.0)  # a 1 ms floor: sub-ms baselines are noise
        if before is not None:
            lo, hi = int(before[0]), int(before[1]) - span
            worst = [p for p in (self._window_p99(cls, s, span) for s in range(lo, hi + 1)) if p is not None]
            bound = max([bound, *worst])
        end = int(self.sc.duration) - span
        start = int(from_t)
        if start > end:
            return None
        last_bad = None
        for sec in range(start, end + 1):
            p = self._window_p99(cls, sec, span)
            if p is not None and p > bound:
                last_bad = sec
        return 0.0 if last_bad is None else float(last_bad + 1 - start)  # every window from then on is good

    def summary(self) -> dict:
        sc = self.sc
        out = {"duration": sc.duration, "classes": {}}
        for c in self.classes:
            row = {"phases": {name: self.window(c, lo, hi) for name, (lo, hi) in sc.phases.items()},
                   "total": self.window(c, 0, sc.duration), "cached_kinds": self.cache_kinds[c]}
            if "before" in sc.phases and "spike" in sc.phases:
                base = row["phases"]["before"]["p99_ms"]
                row["spike_p99_ratio"] = round(row["phases"]["spike"]["p99_ms"] / base, 3) if base else None
                row["settle_s"] = self.settle_seconds(c, base, sc.phases["spike"][1], before=sc.phases["before"])
            out["classes"][c] = row
        out["streams"] = {s.name: {"class": s.cls, "phases": {name: self.window(f"stream:{s.name}", lo, hi)
                                                               for name, (lo, hi) in sc.phases.items()},
                                   "total": self.window(f"stream:{s.name}", 0, sc.duration)} for s in sc.streams}
        if self.rss:
            out["rss_max_bytes"] = max(r for _, r in self.rss)
        return out

    def text(self, summary: dict) -> str:
        lines = []
        for c, row in summary["classes"].items():
            lines.append(f"{c}:")
            for name, w in list(row["phases"].items()) + [("total", row["total"])]:
                lines.append(f"  {name:8} {w['requests']:7d} req  p50 {w['p50_ms']:8.1f}  p90 {w['p90_ms']:8.1f}  "
                             f"p99 {w['p99_ms']:8.1f}  max {w['max_ms']:8.1f} ms  ok {w['ok']}  cached {w['cached']}  "
                             f"rejected {w['rejected']}  errors {w['error']}  timeouts {w['timeout']}")
            if row.get("spike_p99_ratio") is not None:
                lines.append(f"  spike p99 / before p99 = {row['spike_p99_ratio']:.2f}x; p99 over 5 s windows back at "
                             f"baseline {row['settle_s']} s after the spike ended (within 1.25x of before, or no "
                             f"worse than before's worst window)")
            if row["cached_kinds"]:
                lines.append(f"  cached answers by kind: {row['cached_kinds']}")
        for name, row in summary["streams"].items():
            w = row["total"]
            lines.append(f"  stream {name:20} ({row['class']}) {w['requests']:7d} req  p50 {w['p50_ms']:8.1f}  "
                         f"p99 {w['p99_ms']:8.1f} ms  ok {w['ok']}  cached {w['cached']}  rejected {w['rejected']}  "
                         f"errors {w['error']}  timeouts {w['timeout']}")
        if "rss_max_bytes" in summary:
            lines.append(f"server RSS max {summary['rss_max_bytes'] / 2**20:.0f} MiB")
        return "\n".join(lines)

    def plot(self, path: str, title: str = "") -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
        for c in self.classes:
            secs = range(int(self.sc.duration))
            a1.plot(secs, [sum(self.counts[c][s].values()) for s in secs], label=f"{c} offered/s")
            a1.plot(secs, [self.counts[c][s]["cached"] + self.counts[c][s]["rejected"] for s in secs], "--",
                    label=f"{c} shed/s")
            a2.plot(secs, [_ms(self.per_second[c][s], 99) or float("nan") for s in secs], label=f"{c} p99")
        a1.set_ylabel("requests/s")
        a1.legend(fontsize=8)
        a2.set_ylabel("p99 latency (ms)")
        a2.set_yscale("log")
        a2.set_xlabel("seconds")
        a2.legend(fontsize=8)
        if title:
            a1.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
