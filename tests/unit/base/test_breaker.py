"""The circuit breaker's states on a fake clock (pure logic)."""
from tidegate.core.base.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


def test_opens_after_consecutive_failures_then_one_probe_decides():
    now = [0.0]
    b = Breaker(failures=3, reset=1.0, clock=lambda: now[0])
    for _ in range(2):
        assert b.allow()
        b.failure()
    b.success()  # a success in between resets the count
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == OPEN and not b.allow() and b.stats == {"opened": 1, "refused": 1}
    now[0] = 1.01
    assert b.allow() and b.state == HALF_OPEN
    assert not b.allow()  # only one probe at a time
    b.failure()  # the probe failed: open for another reset
    assert b.state == OPEN and not b.allow()
    now[0] = 2.1
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow() and b.allow()
