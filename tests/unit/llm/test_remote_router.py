"""Which remote backend a prompt goes to (core/llm/remote.BackendChooser): prefix affinity, the balance
that overrides it, even cache filling, reserved slots per class, health and breakers."""
from tidegate.core.base import config
from tidegate.core.llm.prefix_cache import block_names
from tidegate.core.llm.remote import Backend, BackendChooser

BC = config.load(None)["breakers"]


def backends(n=2, **spec):
    return [Backend({"url": f"http://b{i}", **spec}, "m", BC, 1000) for i in range(n)]


def names(text: str) -> list[bytes]:
    return block_names(list(text.encode()), 64, "acme")


def test_a_prompt_goes_back_to_the_backend_that_was_sent_its_prefix():
    bs = backends()
    r = BackendChooser(bs, "prefix", slack=4, reserved={})
    long = names("system prompt " * 50 + "question 1")
    bs[1].remember(long)
    assert r.order(long, "standard")[0] is bs[1]
    again = names("system prompt " * 50 + "another question")  # same leading blocks
    assert r.order(again, "standard")[0] is bs[1]
    bs[1].inflight = 5  # too much busier than the other: balance wins over affinity
    assert r.order(again, "standard")[0] is bs[0]


def test_new_prompts_fill_the_caches_evenly():
    bs = backends()
    r = BackendChooser(bs, "prefix", slack=4, reserved={})
    for t in range(8):
        p = names(f"tenant {t} " * 80)
        first = r.order(p, "standard")[0]
        first.remember(p)
    assert abs(len(bs[0].seen) - len(bs[1].seen)) <= len(names("tenant 0 " * 80))


def test_round_robin_and_fallback_order():
    bs = backends(3)
    r = BackendChooser(bs, "round_robin", slack=4, reserved={})
    firsts = [r.order([], "standard")[0] for _ in range(6)]
    assert firsts == bs + bs
    order = r.order([], "standard")
    assert set(order) == set(bs) and len(order) == 3  # the others follow: where connect errors go next


def test_reserved_slots_and_unhealthy_or_open_backends_are_skipped():
    bs = backends(1, max_inflight=4)
    r = BackendChooser(bs, "least_loaded", slack=4, reserved={"critical": 1})
    bs[0].inflight = 3  # the last slot is critical's
    assert r.order([], "standard") == [] and r.order([], "background") == []
    assert r.order([], "critical") == bs
    bs[0].inflight = 0
    bs[0].healthy = False
    assert r.order([], "critical") == []
    bs[0].healthy = True
    for _ in range(20):
        bs[0].breaker.record(False)
    assert r.order([], "critical") == []  # its breaker is open


def test_a_remote_stream_stops_reading_a_window_ahead_until_credit_comes():
    """Flow: the relay awaits sent() after each delta; at the window it waits (so the backend's
    answer is not read and TCP pushes back on it) until give() returns credit."""
    import asyncio

    from tidegate.core.llm.remote import Flow

    async def main():
        flow, sent = Flow(3), []

        async def relay():
            for i in range(10):
                sent.append(i)
                await flow.sent()
        task = asyncio.ensure_future(relay())
        await asyncio.sleep(0.01)
        assert sent == [0, 1, 2] and not task.done()
        flow.give(2)
        await asyncio.sleep(0.01)
        assert sent == [0, 1, 2, 3, 4] and not task.done()
        flow.give(100)
        await asyncio.wait_for(task, 1)
        assert len(sent) == 10
        unbounded = Flow(0)
        for _ in range(1000):
            await asyncio.wait_for(unbounded.sent(), 0.1)
    asyncio.run(main())
