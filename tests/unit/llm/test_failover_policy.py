"""The failover policy (core/llm/failover.py): what follows each outcome, the retry budget,
backoff with jitter and Retry-After."""
import email.utils
import random

import pytest

from tidegate.core.llm import failover as F

POLICY = F.Policy(attempts=3, backoff_base=0.05, backoff_max=2.0, retry_after_max=10.0, retry_lost=False)


def decide(kind, attempt=0, others=True, time_left=30.0, **kw):
    o = F.Outcome(kind, [502, "x", "backend_error", None], kw.pop("retry_after", 0.0), kw.pop("started", False))
    return F.decide(o, attempt, POLICY, others=others, time_left=time_left, rng=random.Random(1), **kw)


@pytest.mark.parametrize("status, code, kind", [
    (429, None, F.REFUSED), (503, None, F.REFUSED), (500, None, F.FAILED), (502, None, F.FAILED),
    (504, None, F.FAILED), (408, None, F.FAILED), (400, "context_length_exceeded", F.CONTEXT),
    (400, "content_filter", F.FILTERED), (400, "invalid_request_error", F.CLIENT), (404, None, F.CLIENT)])
def test_statuses_are_classified(status, code, kind):
    assert F.classify_status(status, code) == kind


def test_client_errors_filters_and_context_are_answered_as_they_are():
    for kind in (F.CLIENT, F.FILTERED, F.CONTEXT):
        assert decide(kind).what == F.ANSWER


def test_refusals_and_failures_go_to_the_next_backend_at_once():
    for kind in (F.UNSENT, F.REFUSED, F.FAILED, F.ENDED):
        assert decide(kind) == F.Action(F.NEXT)


def test_alone_a_backend_is_asked_again_after_a_backoff_or_its_retry_after():
    a = decide(F.FAILED, others=False)
    assert a.what == F.SAME and 0 <= a.wait <= 0.05
    a = decide(F.REFUSED, others=False, retry_after=3.0)
    assert a == F.Action(F.SAME, 3.0)
    assert decide(F.REFUSED, others=False, retry_after=60.0).what == F.ANSWER  # longer than retry_after_max
    assert decide(F.REFUSED, others=False, retry_after=3.0, time_left=2.0).what == F.ANSWER  # past the deadline


def test_attempts_are_bounded():
    assert decide(F.FAILED, attempt=1).what == F.NEXT
    assert decide(F.FAILED, attempt=2).what == F.ANSWER


def test_a_lost_attempt_is_repeated_only_where_allowed():
    assert decide(F.LOST).what == F.ANSWER
    assert decide(F.LOST, idempotent=True).what == F.NEXT
    lenient = POLICY._replace(retry_lost=True)
    o = F.Outcome(F.LOST, [504, "x", "backend_timeout", None])
    assert F.decide(o, 0, lenient, others=True, time_left=30).what == F.NEXT


def test_a_stream_under_way_goes_on_only_where_it_can_be_continued():
    assert decide(F.ENDED, started=True, can_continue=True).what == F.NEXT
    assert decide(F.ENDED, started=True, can_continue=False).what == F.ANSWER


def test_backoff_is_full_jitter_below_its_cap():
    rng = random.Random(7)
    waits = [F.backoff(a, 0.1, 1.0, rng) for a in range(8) for _ in range(50)]
    assert all(0 <= w <= 1.0 for w in waits)
    assert max(F.backoff(0, 0.1, 1.0, rng) for _ in range(200)) <= 0.1
    assert len({round(w, 6) for w in waits}) > 100  # jittered, not a fixed schedule


def test_retry_after_reads_seconds_and_http_dates():
    assert F.retry_after_seconds("7") == 7.0
    assert F.retry_after_seconds(None) == 0.0 and F.retry_after_seconds("soon") == 0.0
    when = email.utils.formatdate(1000.0 + 30, usegmt=True)
    assert F.retry_after_seconds(when, now=1000.0) == pytest.approx(30.0)


def test_the_retry_budget_allows_a_ratio_of_requests_plus_a_floor():
    b = F.RetryBudget(ratio=0.2, min_per_s=0.1, ttl=10.0)  # floor: 1 retry per 10 s
    for i in range(100):
        b.deposit(now=i * 0.01)
    allowed = sum(b.withdraw(now=1.0) for _ in range(50))
    assert allowed == 21 and b.exhausted == 29  # 0.2 x 100 requests + 1
    assert b.withdraw(now=12.0)  # the window moved on: its requests and retries expired


def test_falls_back_only_for_what_another_model_may_answer():
    assert F.falls_back([503, "x", "backend_unavailable", None])
    assert F.falls_back([400, "x", "context_length_exceeded", "messages"])
    assert not F.falls_back([400, "x", "content_filter", None])
    assert not F.falls_back([400, "x", "invalid_parameter", "temperature"])
