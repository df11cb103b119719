"""A replica's queue in front of the student: one thread computes; requests wait their turn, merged.

Ray Serve's ``@serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first request, and
the batches it closes while the student is busy queue one behind another: under load a replica
computed about 10 images per call with 32 clients waiting (``addctl serve-bench``). Here every
batch Serve hands over joins one queue, and when the compute thread is free it takes every waiting
request, up to ``max_images``, into one network call: the batch is whatever arrived meanwhile,
and a lone request on an idle replica waits for nothing.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the caller went away (a cancelled request)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class BatchQueue:
    """``compute(items) -> results`` on one thread, over merged waiting items (see the module docstring).

    ``size(item)`` is an item's share of ``max_images``; ``merge=False`` computes one item per call.
    """

    def __init__(self, compute: Callable[[list], list], size: Callable, max_images: int, merge: bool = True):
        self.compute, self.size, self.max_images, self.merge = compute, size, max_images, merge
        self._waiting: deque[tuple[object, asyncio.Future]] = deque()
        self._ready = threading.Condition()
        threading.Thread(target=self._run, name="student", daemon=True).start()

    async def submit(self, items: Sequence) -> list:
        """The results of ``items``, in order, once the compute thread has been through them."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        with self._ready:
            self._waiting.extend(zip(items, futures, strict=True))
            self._ready.notify()
        return list(await asyncio.gather(*futures))

    def _take(self) -> list[tuple[object, asyncio.Future]]:
        with self._ready:
            while not self._waiting:
                self._ready.wait()
            taken = [self._waiting.popleft()]
            images = self.size(taken[0][0])
            while self.merge and self._waiting and images + self.size(self._waiting[0][0]) <= self.max_images:
                taken.append(self._waiting.popleft())
                images += self.size(taken[-1][0])
            return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            try:
                results, error = self.compute([item for item, _ in taken]), None
            except Exception as err:  # noqa: BLE001  (handed to every request of the call)
                results, error = [None] * len(taken), err
            for (_, future), result in zip(taken, results, strict=True):
                future.get_loop().call_soon_threadsafe(_settle, future, result, error)
