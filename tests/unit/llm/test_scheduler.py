"""Traffic classes: strict priority, reserved slots, deadlines, bounded queues (pure logic)."""
import pytest

from tidegate.core.llm.scheduler import QueueFull, Scheduler


class Req:
    def __init__(self, name, deadline=1e9):
        self.name, self.deadline = name, deadline


def names(items):
    return [i.name for i in items]


def test_background_flood_never_takes_the_reserved_slot():
    s = Scheduler(4, {"critical": 1}, {})
    for i in range(10):
        s.submit(Req(f"bg{i}"), "background")
    admitted, _ = s.admit(now=0)
    assert names(admitted) == ["bg0", "bg1", "bg2"]  # the 4th slot stays free for critical work
    s.submit(Req("crit"), "critical")
    admitted, _ = s.admit(now=0)
    assert names(admitted) == ["crit"]


def test_strict_priority_when_a_slot_frees():
    s = Scheduler(2, {}, {})
    s.submit(Req("b"), "background")
    s.submit(Req("s"), "standard")
    s.submit(Req("c"), "critical")
    admitted, _ = s.admit(now=0)
    assert names(admitted) == ["c", "s"]
    s.finished("critical")
    assert names(s.admit(now=0)[0]) == ["b"]


def test_expired_requests_leave_the_queue_without_a_slot():
    s = Scheduler(1, {}, {})
    s.submit(Req("late", deadline=5), "standard")
    s.submit(Req("ok", deadline=50), "standard")
    admitted, expired = s.admit(now=10)
    assert names(expired) == ["late"] and names(admitted) == ["ok"]


def test_queue_is_bounded_per_class_and_cancel_removes():
    s = Scheduler(1, {}, {"background": 2})
    s.submit(Req("a"), "background")
    s.submit(Req("b"), "background")
    with pytest.raises(QueueFull):
        s.submit(Req("c"), "background")
    s.submit(Req("x"), "standard")  # other classes have their own queue
    assert names(s.remove(lambda r: r.name == "b")) == ["b"]
    assert s.queued() == {"critical": 0, "standard": 1, "background": 1}
