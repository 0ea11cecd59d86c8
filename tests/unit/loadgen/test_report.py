"""The loadtest report's settle time: back at baseline = every later window within 1.25x of the
before phase's p99, or no worse than the worst window the before phase had itself."""
from types import SimpleNamespace

from tidegate.core.loadgen.report import Recorder


def recorder(latency_at):
    stream = SimpleNamespace(name="s", cls="background")
    sc = SimpleNamespace(duration=60, streams=[stream], phases={"before": [0, 20], "spike": [20, 30]})
    rec = Recorder(sc)
    for sec in range(60):
        for i in range(20):
            rec.record(stream, sec + i / 20, latency_at(sec, i), "ok")
    return rec


def test_settles_when_windows_are_back_within_the_bound():
    rec = recorder(lambda sec, i: 0.100 if 30 <= sec < 38 else 0.010)  # slow until 8 s after the spike
    assert rec.settle_seconds("background", 10.0, 30, before=(0, 20)) == 8.0
    assert recorder(lambda sec, i: 0.010).settle_seconds("background", 10.0, 30, before=(0, 20)) == 0.0


def test_a_sparse_streams_noisy_windows_before_raise_the_bound():
    # one slow request every 10 s, before and after alike: as noisy after the spike as before it
    def lat(sec, i):
        return 0.200 if sec % 10 == 3 and i < 3 else 0.010
    rec = recorder(lat)
    assert rec.settle_seconds("background", 10.0, 30, before=(0, 20)) == 0.0  # the before phase's worst window
    assert rec.settle_seconds("background", 10.0, 30) > 0  # against the whole-phase p99 alone, never settled
