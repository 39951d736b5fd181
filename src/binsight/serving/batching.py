"""Dynamic batching: concurrent requests share one model call.

Requests wait at most `max_wait_ms` for company, and only when company is on the way (another request
is being decoded); a batch leaves as soon as it is full. While the model
runs (in a worker thread, so the event loop keeps accepting requests) the next batch gathers. The queue
is bounded: when it is full, `submit` refuses at once, and the caller answers 503 with Retry-After,
instead of letting memory and latency grow without limit.

Each item names the model it was prepared for. During a hot reload a batch may hold items for the old
and the new model; each group runs on its own model, so no request is dropped or mis-sized.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import statistics
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_Item = tuple[Any, np.ndarray, "asyncio.Future[np.ndarray]"]


class QueueFullError(RuntimeError):
    pass


class DynamicBatcher:
    def __init__(
        self,
        run_batch: Callable[[Any, np.ndarray], np.ndarray],
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        queue_size: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
        on_the_way: Callable[[int], int] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(queue_size)
        self.on_batch = on_batch
        self.on_the_way = on_the_way
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dynamic-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    async def submit(self, model: Any, item: np.ndarray) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((model, item, future))
        except asyncio.QueueFull:
            raise QueueFullError("the request queue is full") from None
        return await future

    async def _collect(self) -> list[_Item]:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            if self.on_the_way is not None and self.on_the_way(len(batch)) <= 0:
                break  # no other request is being prepared: waiting would only add latency
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [entry for entry in await self._collect() if not entry[2].cancelled()]
            groups: dict[int, list[_Item]] = {}
            for entry in batch:
                groups.setdefault(id(entry[0]), []).append(entry)
            for group in groups.values():
                await self._run_group(loop, group)

    async def _run_group(self, loop: asyncio.AbstractEventLoop, group: list[_Item]) -> None:
        model = group[0][0]
        started = loop.time()
        try:
            outputs = await loop.run_in_executor(
                self._executor, self.run_batch, model, np.stack([item for _, item, _ in group])
            )
        except Exception as exc:  # a failed model call fails its requests, not the server
            log.exception("model call failed for a batch of %d", len(group))
            for _, _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        if self.on_batch:
            self.on_batch(len(group), loop.time() - started)
        for (_, _, future), output in zip(group, outputs, strict=True):
            if not future.done():
                future.set_result(output)


class Admission:
    """Load shedding by expected wait: admit an image only if the work already admitted would be done
    within `max_wait_s` at the measured speed of the model.

    A queue bounded by length alone lets latency grow with the load until it is full (256 images at
    200 img/s is over a second); bounding the expected wait keeps accepted requests fast at any load,
    and a refused request is answered at once, before its image is decoded.
    """

    def __init__(self, max_wait_s: float, ceiling: int, floor: int = 1) -> None:
        self.max_wait_s = max_wait_s
        self.floor, self.ceiling = floor, max(floor, ceiling)
        self.in_system = 0
        self._recent: collections.deque[float] = collections.deque(maxlen=32)
        self.seconds_per_image: float | None = None

    @property
    def limit(self) -> int:
        # A clock too coarse for a fast batch measures 0 s: no basis for a limit, as before any batch.
        if not self.seconds_per_image or self.max_wait_s <= 0:
            return self.ceiling
        return max(self.floor, min(self.ceiling, int(self.max_wait_s / self.seconds_per_image)))

    def has_room(self, images: int = 1) -> bool:
        return self.in_system == 0 or self.in_system + images <= self.limit

    def try_enter(self, images: int = 1) -> bool:
        if not self.has_room(images):
            return False
        self.in_system += images
        return True

    def leave(self, images: int = 1) -> None:
        self.in_system -= images

    def on_the_way(self, collected: int) -> int:
        """Admitted images not yet in a batch of `collected` (still being read or decoded)."""
        return self.in_system - collected

    def observe(self, batch_size: int, seconds: float) -> None:
        """Seconds per image of recent model calls (what the queue drains at): the median of the last
        32, so one slow call (a hot reload loading beside it, a GC pause) does not shed a burst."""
        self._recent.append(seconds / max(1, batch_size))
        self.seconds_per_image = statistics.median(self._recent)
