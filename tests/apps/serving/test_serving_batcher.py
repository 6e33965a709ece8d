"""The cross-task batcher on its own (no HTTP, no model): what goes into a batch, bounds, errors,
draining on close."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ftn.apps.serving.batcher import BatcherClosed, CrossTaskBatcher, Overloaded


class Recorder:
    def __init__(self, fail_task=None, raise_all=False, gate=None):
        self.batches = []
        self.fail_task = fail_task
        self.raise_all = raise_all
        self.gate = gate
        self.threads = set()

    def __call__(self, tasks, inputs):
        if self.gate is not None:
            self.gate.wait(30)
        self.threads.add(threading.get_ident())
        self.batches.append(list(zip(tasks, inputs)))
        if self.raise_all:
            raise RuntimeError("model exploded")
        return [ValueError(f"bad {t}") if t == self.fail_task else (t, x * 10) for t, x in zip(tasks, inputs)]


def run(coro):
    return asyncio.run(coro)


async def until(condition, timeout=10.0):
    """Wait (polling) until condition() holds: no fixed sleeps on a busy CI machine."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def test_requests_for_different_tasks_arriving_together_share_one_batch():
    async def main():
        rec = Recorder()
        b = CrossTaskBatcher(rec, max_batch=16, max_wait_ms=50)
        b.start()
        results = await asyncio.gather(*(b.submit(f"t{i % 4}", i) for i in range(12)))
        await b.close()
        return rec, results

    rec, results = run(main())
    assert results == [(f"t{i % 4}", i * 10) for i in range(12)]  # each caller gets its own answer
    assert len(rec.batches) == 1 and {t for t, _ in rec.batches[0]} == {"t0", "t1", "t2", "t3"}
    assert len(rec.threads) == 1  # the model runs on one executor thread


def test_max_batch_bounds_every_batch_and_order_is_kept():
    async def main():
        rec = Recorder()
        b = CrossTaskBatcher(rec, max_batch=5, max_wait_ms=20)
        b.start()
        results = await asyncio.gather(*(b.submit("a", i) for i in range(23)))
        await b.close()
        return rec, results

    rec, results = run(main())
    assert results == [("a", i * 10) for i in range(23)]
    assert max(len(x) for x in rec.batches) == 5 and sum(len(x) for x in rec.batches) == 23
    assert [x for batch in rec.batches for _, x in batch] == list(range(23))


def test_a_lone_request_waits_at_most_the_window():
    async def main():
        rec = Recorder()
        b = CrossTaskBatcher(rec, max_batch=64, max_wait_ms=30)
        b.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await b.submit("a", 1)
        waited = loop.time() - t0
        # a second request 5 ms later still joins the first one's batch
        first = asyncio.create_task(b.submit("a", 2))
        await asyncio.sleep(0.005)
        second = await b.submit("b", 3)
        await first
        await b.close()
        return rec, result, waited, second

    rec, result, waited, second = run(main())
    assert result == ("a", 10) and second == ("b", 30)
    assert 0.025 <= waited < 2.0  # waited for the window, not for a full batch
    assert [len(x) for x in rec.batches] == [1, 2]


def test_errors_fail_only_their_request_or_the_whole_batch():
    async def main():
        b = CrossTaskBatcher(Recorder(fail_task="bad"), max_batch=8, max_wait_ms=10)
        b.start()
        out = await asyncio.gather(b.submit("ok", 1), b.submit("bad", 2), return_exceptions=True)
        await b.close()
        b2 = CrossTaskBatcher(Recorder(raise_all=True), max_batch=8, max_wait_ms=10)
        b2.start()
        out2 = await asyncio.gather(b2.submit("x", 1), b2.submit("y", 2), return_exceptions=True)
        after = await asyncio.gather(b2.submit("x", 3), return_exceptions=True)  # still serving
        await b2.close()
        return out, out2, after

    out, out2, after = run(main())
    assert out[0] == ("ok", 10) and isinstance(out[1], ValueError) and "bad bad" in str(out[1])
    assert all(isinstance(e, RuntimeError) and "exploded" in str(e) for e in out2)
    assert isinstance(after[0], RuntimeError)


def test_close_drains_queued_requests_and_refuses_new_ones():
    gate = threading.Event()

    async def main():
        rec = Recorder(gate=gate)
        b = CrossTaskBatcher(rec, max_batch=4, max_wait_ms=1)
        b.start()
        pending = [asyncio.create_task(b.submit("a", i)) for i in range(10)]
        await until(lambda: b.in_flight == 4 and b.queued == 6)  # first batch blocked in the model
        closing = asyncio.create_task(b.close())
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherClosed):
            await b.submit("a", 99)
        gate.set()
        await closing
        return [p.result() for p in pending]

    assert run(main()) == [("a", i * 10) for i in range(10)]


def test_a_full_queue_is_refused_not_buffered_forever():
    gate = threading.Event()

    async def main():
        b = CrossTaskBatcher(Recorder(gate=gate), max_batch=1, max_wait_ms=0, max_queue=3)
        b.start()
        pending = [asyncio.create_task(b.submit("a", i)) for i in range(3)]
        await until(lambda: b.in_flight == 1 and b.queued == 2)  # one running, two queued
        pending.append(asyncio.create_task(b.submit("a", 3)))
        await until(lambda: b.queued == 3)
        with pytest.raises(Overloaded):
            await b.submit("a", 5)
        gate.set()
        out = await asyncio.gather(*pending)
        await b.close()
        return out

    assert run(main()) == [("a", i * 10) for i in range(4)]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        CrossTaskBatcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        CrossTaskBatcher(Recorder(), max_wait_ms=-1)
