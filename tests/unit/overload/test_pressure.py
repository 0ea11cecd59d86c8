"""CoDel's rule per class, DAGOR-style shed levels, Retry-After from the drain rate, and the
shed policy (pure logic)."""
from tidegate.core.base import config
from tidegate.core.overload.pressure import ClassMonitor
from tidegate.core.overload.shedding import Shedder, policy_problem

EMPTY = {"critical": None, "standard": None, "background": None}


def test_overloaded_only_after_a_whole_interval_above_target():
    m = ClassMonitor(target=0.005, interval=0.1)
    m.observe(10.0, dict(EMPTY, background=9.99), {"background": 40})  # 10 ms delay: above, starts the clock
    assert not m.overloaded["background"] and m.shed() == []
    m.observe(10.05, dict(EMPTY, background=10.04), {"background": 40})
    assert m.shed() == []
    m.observe(10.11, dict(EMPTY, background=10.10), {"background": 40})  # above for 110 ms
    assert m.overloaded["background"] and m.shed() == ["background"]
    m.observe(10.12, dict(EMPTY, background=10.119), {"background": 1})  # 1 ms: below target, at once fine
    assert m.shed() == []


def test_shed_levels_travel_down_from_the_overloaded_class():
    m = ClassMonitor(0.005, 0.1)
    m.overloaded.update(standard=True)
    assert m.shed() == ["standard", "background"]
    m.overloaded.update(critical=True)
    assert m.shed() == ["standard", "background"]  # critical is never shed for its own queue


def test_retry_after_follows_the_drain_rate():
    m = ClassMonitor()
    for i in range(11):
        m.finished("background", 100.0 + i * 0.1)  # 10 finished per second
    m.observe(101.0, dict(EMPTY, background=100.5), {"background": 45})
    assert m.retry_after("background", 101.0) == 5
    m.observe(101.0, EMPTY, {})
    assert m.retry_after("background", 101.0) == 1
    assert ClassMonitor().retry_after("standard", 1.0) == 1  # no queue, no history: come back soon


def test_policy_and_forced_shedding():
    cfg = config.defaults()
    s = Shedder(cfg)
    assert s.check("background", "inference:x") is None
    s.forced = {"background", "critical"}
    assert s.check("background", "inference:x") == 1 and s.cached("background")
    assert s.check("critical", "inference:x") is None  # never
    assert s.served("background", "stale") == [(b"x-tidegate-shed", b"background")]
    e = s.reject("standard", 7, "model 'm'")
    assert e.status == 503 and (b"retry-after", b"7") in e.headers and s.stats["shed_standard_rejected"] == 1
    assert "needs a policy" in policy_problem({"critical": "never", "standard": "drop", "background": "cached"})


def test_a_late_event_loop_sheds_background_until_it_keeps_time_again():
    import asyncio
    import time as _time

    from tidegate.core.overload.pressure import LoopLag

    async def main():
        loop = asyncio.get_running_loop()
        # a 30 ms target: a busy CI machine delays timers by a few ms, not by tens
        lag = LoopLag(loop, target=0.03, share=0.05, every=0.005)
        await asyncio.sleep(0.3)
        assert not lag.overloaded
        for _ in range(20):  # the loop is busy: each turn blocks 50 ms
            _time.sleep(0.05)
            await asyncio.sleep(0)
        assert lag.overloaded
        await asyncio.sleep(1.5)  # on time for a whole window: the share falls under half
        assert not lag.overloaded
        lag.close()
    asyncio.run(main())


def test_the_end_of_an_overload_is_published_at_once(tmp_path):
    """A shed set that changes goes out at once, not at the next interval: right after a burst
    the next request on an idle model had been shed on the stale word."""
    import orjson
    import zmq
    from tidegate.core.overload.pressure import Publisher
    ctx = zmq.Context()
    pub = Publisher(ctx, f"ipc://{tmp_path}/p.sock", "inference:m", interval=10.0)
    sent = []
    pub.sock.close(0)
    pub.sock = type("Capture", (), {"send": lambda self, frame, flags=0: sent.append(orjson.loads(frame)),
                                    "close": lambda self, linger=0: None})()
    m = ClassMonitor(target=0.005, interval=0.1)
    m.observe(0.0, {"background": -1.0}, {"background": 5})  # queued since long ago: above target
    m.observe(0.2, {"background": -1.0}, {"background": 5})
    pub.maybe_publish(m, 0.2)
    assert sent[-1]["shed"] == ["background"]
    pub.maybe_publish(m, 0.3)  # nothing changed within the interval: quiet
    assert len(sent) == 1
    m.observe(0.31, {}, {})  # the queue emptied (cancelled, served)
    pub.maybe_publish(m, 0.31)
    assert len(sent) == 2 and sent[-1]["shed"] == []
    ctx.term()
