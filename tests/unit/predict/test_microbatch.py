"""Micro-batching on a real asyncio loop: one batch per loop turn, cut at max_batch, the
window grows only under load and returns to 0 when idle, errors fail only their items."""
import asyncio

from tidegate.core.predict.microbatch import MicroBatcher


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_concurrent_submissions_share_a_batch_and_idle_ones_do_not_wait():
    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        b = MicroBatcher(loop, lambda items: seen.append(list(items)) or [i * 10 for i in items], 4, 0.01)
        futs = [b.submit(i) for i in range(10)]
        assert await asyncio.gather(*futs) == [i * 10 for i in range(10)]
        assert [len(s) for s in seen] == [4, 4, 2]  # cut at max_batch
        t0 = loop.time()
        b.window = 0.0
        assert await b.submit(7) == 70  # idle: answered at the end of the turn, no window
        assert loop.time() - t0 < 0.005
    run(main())


def test_window_grows_under_load_and_decays_when_idle():
    async def main():
        loop = asyncio.get_running_loop()
        b = MicroBatcher(loop, lambda items: list(items), 8, 0.008)
        for _ in range(3):
            await asyncio.gather(*(b.submit(i) for i in range(8)))  # full batches: worth waiting
        assert b.window == 0.003
        for _ in range(8):
            await b.submit(1)  # lone requests: the window halves each time, then is 0
        assert b.window == 0.0
    run(main())


def test_an_exception_fails_its_item_or_the_whole_batch():
    async def main():
        loop = asyncio.get_running_loop()
        b = MicroBatcher(loop, lambda items: [ValueError("bad") if i == 1 else i for i in items], 8, 0.0)
        out = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        assert out[0] == 0 and isinstance(out[1], ValueError) and out[2] == 2

        async def failing(items):
            raise RuntimeError("scorer down")
        b2 = MicroBatcher(loop, failing, 8, 0.0)
        out = await asyncio.gather(*(b2.submit(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(e, RuntimeError) for e in out)
    run(main())
