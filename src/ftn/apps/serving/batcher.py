"""Cross-task dynamic batching, independent of HTTP.

Requests ``(task, input)`` from any number of concurrent callers go into one queue. A single
loop takes the oldest request and waits until either ``max_batch`` requests are queued or the
oldest has waited ``max_wait_ms``; it then hands the whole batch — requests for *different* tasks
together — to ``run_batch(tasks, inputs)`` on the model's executor (one thread, so the model is
never used concurrently) and resolves every caller's future with its own result. While a batch
runs, new requests queue up, so under load batches fill without waiting at all; an idle server
adds at most ``max_wait_ms`` to a lone request.

``run_batch`` returns one result per request, in order; an ``Exception`` instance in place of a
result fails only that request (e.g. its task was removed meanwhile). If ``run_batch`` raises,
every request of the batch fails with that error.

``close()`` stops accepting requests and drains: everything already queued still runs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...core.errors import FTNError

__all__ = ["CrossTaskBatcher", "BatcherClosed", "Overloaded", "BatchStats"]


class BatcherClosed(FTNError):
    """The batcher is shutting down and takes no new requests."""


class Overloaded(FTNError):
    """The queue is full: the server is receiving more than it can run."""


@dataclass
class _Request:
    task: str
    x: Any
    future: asyncio.Future
    enqueued: float


@dataclass
class BatchStats:
    """What one batch held (passed to ``on_batch``)."""

    tasks: list[str]
    queue_wait_s: list[float]
    run_s: float
    per_task: dict[str, int] = field(default_factory=dict)


RunBatch = Callable[[Sequence[str], Sequence[Any]], Sequence[Any]]


class CrossTaskBatcher:
    def __init__(self, run_batch: RunBatch, *, max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 4096, executor: concurrent.futures.Executor | None = None,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._own_executor = executor is None
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ftn-model")
        self._pending: collections.deque[_Request] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.in_flight = 0  # requests taken from the queue whose batch is running

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="ftn-batcher")

    async def close(self) -> None:
        """Take no new requests; finish every queued one; then stop."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._own_executor:
            self.executor.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ requests
    async def submit(self, task: str, x: Any) -> Any:
        """Queue one request and wait for its result (or its exception)."""
        if self._closing:
            raise BatcherClosed("the server is shutting down")
        if self._task is None:
            raise BatcherClosed("the batcher is not running (call start())")
        if len(self._pending) >= self.max_queue:
            raise Overloaded(f"too many queued requests ({self.max_queue}); retry later")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(task, x, future, time.perf_counter()))
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for a full batch, at most max_wait after the oldest request arrived.
            while len(self._pending) < self.max_batch and not self._closing:
                remaining = self._pending[0].enqueued + self.max_wait - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            batch = [r for r in batch if not r.future.done()]  # callers that went away
            if not batch:
                continue
            self.in_flight = len(batch)
            started = time.perf_counter()
            tasks, inputs = [r.task for r in batch], [r.x for r in batch]
            try:
                results: Sequence[Any] = await loop.run_in_executor(self.executor, self.run_batch, tasks, inputs)
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} requests")
            except Exception as exc:  # noqa: BLE001 - every caller gets the error
                results = [exc] * len(batch)
            finally:
                self.in_flight = 0
            run_s = time.perf_counter() - started
            for r, result in zip(batch, results):
                if r.future.done():
                    continue
                if isinstance(result, BaseException):
                    r.future.set_exception(result)
                else:
                    r.future.set_result(result)
            if self.on_batch is not None:
                per_task: dict[str, int] = {}
                for t in tasks:
                    per_task[t] = per_task.get(t, 0) + 1
                try:
                    self.on_batch(BatchStats(tasks, [started - r.enqueued for r in batch], run_s, per_task))
                except Exception:  # noqa: BLE001 - metrics must never stop serving
                    pass
