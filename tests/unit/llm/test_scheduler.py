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


class TReq:
    def __init__(self, name, tenant, deadline=1e9):
        self.name, self.tenant, self.deadline = name, tenant, deadline


def test_tenants_of_one_class_share_by_tokens_served_not_arrival():
    """Virtual token counters: a tenant flooding the background class does not starve a light
    one, and a tenant coming back banks no credit from its idle time."""
    s = Scheduler(1, {}, {"background": 10000})
    for i in range(100):
        s.submit(TReq(f"heavy{i}", "heavy"), "background")
    s.submit(TReq("light0", "light"), "background")
    s.submit(TReq("light1", "light"), "background")
    order = []
    for _ in range(6):
        (item,), _ = s.admit(now=0)
        order.append(item.name)
        s.charge("background", item.tenant, prompt_tokens=10, output_tokens=20)  # every request the same size
        s.finished("background", item.tenant)
    # both tenants start at 0: they alternate while both wait, though heavy queued 100 first
    assert order[:4] in (["heavy0", "light0", "heavy1", "light1"], ["light0", "heavy0", "light1", "heavy1"])
    assert order[4:] == ["heavy2", "heavy3"]  # light has nothing waiting: heavy gets the rest
    # light returns after heavy was served alone for a while: it starts at the lowest active counter
    s.submit(TReq("light2", "light"), "background")
    assert s.counters["background"]["light"] == s.counters["background"]["heavy"]
    (item,), _ = s.admit(now=0)
    assert item.name in ("light2", "heavy4")


def test_fair_shares_keep_deadlines_and_cancel():
    s = Scheduler(1, {}, {})
    s.submit(TReq("a-late", "a", deadline=5), "standard")
    s.submit(TReq("b-ok", "b", deadline=50), "standard")
    s.submit(TReq("a-ok", "a", deadline=50), "standard")
    assert names(s.remove(lambda r: r.name == "a-ok")) == ["a-ok"]
    admitted, expired = s.admit(now=10)
    assert names(expired) == ["a-late"] and names(admitted) == ["b-ok"] and s.queued()["standard"] == 0
