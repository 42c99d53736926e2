"""Dynamic batching: requests that arrive together run as one forward pass.

Each request puts one preprocessed image into a bounded pending list and awaits its row of the
output. One task in the event loop forms the batches: it takes the oldest image and waits for
more while other requests are still being received or decoded (:meth:`Batcher.arriving`), until
``max_batch`` are there or ``max_wait_s`` has passed since that oldest one arrived. A request
that comes alone runs at once, and images that queued while the previous batch ran go together.
The model runs on one worker thread (the event loop keeps accepting and decoding meanwhile);
anything else that touches the model (the explain pictures, which hook into it) runs on that
same thread, never beside a batch.

The pending list is bounded: past ``max_queue`` images :meth:`Batcher.submit` raises
:class:`QueueFull` at once, with an estimate of when to retry, so overload is a 503, never an
ever-growing queue.
"""
import asyncio
import math
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Deque

import torch


class QueueFull(Exception):
    def __init__(self, pending: int, retry_after_s: int):
        super().__init__(f'{pending} images are waiting (the limit, --max-queue); retry in {retry_after_s} s')
        self.retry_after_s = retry_after_s


@dataclass
class _Item:
    x: torch.Tensor
    future: asyncio.Future
    arrived: float


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    refused: int = 0
    seconds: float = 0.0

    def as_json(self) -> dict:
        return {'batches': self.batches, 'images': self.images, 'refused': self.refused,
                'mean_batch': round(self.images / self.batches, 2) if self.batches else 0.0}


class Batcher:
    """``await submit(x)`` -> ``run_batch(stack of x)[i]``; ``await exclusive(fn)`` runs ``fn`` between batches."""

    def __init__(self, run_batch: Callable[[torch.Tensor], torch.Tensor], max_batch: int = 16,
                 max_wait_s: float = 0.005, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError('max_batch and max_queue must be at least 1, max_wait_s at least 0')
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._pending: Deque[_Item] = deque()
        self._arrival = asyncio.Event()
        self._closing = False
        self._arriving = 0
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix='t2tvit-model')

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def arriving_now(self) -> int:
        return self._arriving

    @contextmanager
    def arriving(self):
        """Around receiving and decoding a request's image: a batch being formed waits for it (within the window)."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._arrival.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._form_batches())

    async def close(self) -> None:
        """Run what is pending, then stop (the server calls it after the last request has been answered)."""
        self._closing = True
        self._arrival.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def retry_after(self) -> int:
        """Seconds until the pending images have likely run: batches ahead x the mean batch time (at least 1)."""
        per_batch = self.stats.seconds / self.stats.batches if self.stats.batches else 1.0
        return max(1, math.ceil((self.pending / self.max_batch + 1) * per_batch))

    async def submit(self, x: torch.Tensor) -> torch.Tensor:
        if self._closing:
            raise QueueFull(self.pending, 1)
        if len(self._pending) >= self.max_queue:
            self.stats.refused += 1
            raise QueueFull(self.pending, self.retry_after())
        loop = asyncio.get_running_loop()
        item = _Item(x, loop.create_future(), loop.time())
        self._pending.append(item)
        self._arrival.set()
        return await item.future

    async def exclusive(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the model's thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _form_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._arrival.clear()
                await self._arrival.wait()
                continue
            deadline = self._pending[0].arrived + self.max_wait_s
            while len(self._pending) < self.max_batch and self._arriving > 0 and not self._closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            batch = [item for item in batch if not item.future.done()]  # a client that went away
            if not batch:
                continue
            start = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._executor, self.run_batch, torch.stack([i.x for i in batch]))
            except Exception as e:  # the model failed on this batch: each of its requests gets the error
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            self.stats.seconds += time.perf_counter() - start
            self.stats.batches += 1
            self.stats.images += len(batch)
            for item, row in zip(batch, out):
                if not item.future.done():
                    item.future.set_result(row)
