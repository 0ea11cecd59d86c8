"""The sliding-window breaker on a fake clock (pure logic): failure rate and slow-call rate over
the last calls, open for a while, trial calls decide."""
from tidegate.core.base.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


def breaker(now, **kw):
    args = dict(window=10, min_calls=4, failure_rate=0.5, slow_call=0.1, slow_rate=0.6, open_for=1.0, trial_calls=2)
    return Breaker(**{**args, **kw}, clock=lambda: now[0])


def test_failure_rate_over_the_window_opens_it():
    now = [0.0]
    b = breaker(now)
    for ok in (False, False, False):  # under min_calls: no verdict yet
        assert b.allow()
        b.record(ok)
    assert b.state == CLOSED
    b.record(True)  # 3 of 4 failed
    assert b.state == OPEN and not b.allow() and b.stats == {"opened": 1, "refused": 1}


def test_a_healthy_window_absorbs_scattered_failures():
    now = [0.0]
    b = breaker(now)
    for i in range(40):
        b.record(i % 3 != 2)  # a third fail: under 50%
    assert b.state == CLOSED and b.describe()["calls"] == 10


def test_slow_calls_open_it_too_and_trials_decide():
    now = [0.0]
    b = breaker(now)
    for _ in range(4):
        b.record(True, 0.5)  # all slow
    assert b.state == OPEN
    now[0] = 1.01
    assert b.allow() and b.state == HALF_OPEN and b.allow() and not b.allow()  # two trial calls only
    b.record(True, 0.01)
    b.record(False)  # 1 of 2 trials failed: 50% -> open again
    assert b.state == OPEN and not b.allow()
    now[0] = 2.1
    assert b.allow() and b.allow()
    b.record(True, 0.01)
    b.record(True, 0.01)
    assert b.state == CLOSED and b.describe()["calls"] == 0 and b.allow()


def test_trials_never_reported_count_as_failed():
    now = [0.0]
    b = breaker(now)
    for _ in range(4):
        b.record(False)
    now[0] = 1.01
    assert b.allow() and b.allow()  # two trials out; their callers gave up and never report
    now[0] = 1.5
    assert not b.allow() and b.state == HALF_OPEN  # still within open_for: wait for them
    now[0] = 2.1
    assert not b.allow() and b.state == OPEN  # not back within open_for: open again
    now[0] = 3.2
    assert b.allow() and b.state == HALF_OPEN  # a fresh round of trials


def test_one_tenants_own_failures_open_its_breaker_and_not_the_shared_one():
    from tidegate.core.base.breaker import TenantBreakers
    from tidegate.core.messaging.protocol import END, ERR, failure
    from tidegate.workers.ingress.routes.openai import _counted
    make = lambda: Breaker(window=10, min_calls=4, failure_rate=0.5)  # noqa: E731
    shared, tenants = make(), TenantBreakers(make)

    def outcome(tenant, kind, payload):
        _counted(lambda k, p: None, shared, tenants.of(tenant))(kind, payload)
    for _ in range(6):  # the attacker's inputs fail inside the worker
        outcome("attacker", ERR, failure(500, "worker error", "internal"))
    outcome("victim", END, {"text": ""})
    assert tenants.of("attacker").state == "open" and not tenants.of("attacker").allow()
    assert shared.state == "closed" and tenants.of("victim").allow()
    for code, status in (("reader_stalled", 504), ("queue_full", 503), ("invalid_messages", 400)):
        for _ in range(6):  # a client that stopped reading, load, a client error: nobody's failure
            outcome("victim", ERR, failure(status, "x", code))
    assert shared.state == "closed" and tenants.of("victim").state == "closed"
    for _ in range(6):  # the worker gone: everyone's
        outcome("victim", ERR, failure(503, "gone", "worker_unavailable"))
    assert shared.state == "open"


def test_tenant_breakers_are_bounded():
    from tidegate.core.base.breaker import TenantBreakers
    t = TenantBreakers(Breaker, max_tenants=3)
    first = t.of("a")
    for name in "bcd":
        t.of(name)
    assert len(t.by_tenant) == 3 and t.of("a") is not first
