"""This rank's share of the Ray Data stream as micro-batches, with a position that checkpoints can hold.

Ray Data's iterators keep no mid-stream position, so the position is a count: the checkpoint records
how many micro-batches each rank consumed, and a resumed run reads and drops that many (the data
order is a pure function of (seed, epoch), and so, for a given number of workers, is each rank's
share). Skipping costs reading and decoding what is skipped; it is done lazily, so a run restored
at its last step reads nothing.
"""

from __future__ import annotations

import numpy as np


class BatchStream:
    """This rank's micro-batches from its Ray Data shard, pass after pass, counted.

    ``consumed`` is the position recorded in checkpoints; ``skip`` replays a recorded position by
    reading and dropping that many micro-batches (Ray Data iterators have no seek).
    """

    def __init__(self, shard, batch_size: int, skip: int = 0, prefetch_batches: int = 2):
        if shard is None:
            raise ValueError("the trainer has no 'train' dataset: pass datasets={'train': ...}")
        self.shard = shard
        self.batch_size = batch_size
        self.prefetch_batches = prefetch_batches
        self.consumed = 0
        self.epoch = 0
        self._it = None
        self._skip = skip  # done on first use: a run restored at its last step reads nothing

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while self.consumed < self._skip:
            self._next()
        return self._next()

    def _next(self) -> dict[str, np.ndarray]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(
                    self.shard.iter_batches(
                        batch_size=self.batch_size,
                        batch_format="numpy",
                        drop_last=True,
                        prefetch_batches=self.prefetch_batches,
                    )
                )
            try:
                rows = next(self._it)
            except StopIteration:
                self._it = None
                continue
            self.consumed += 1
            if "epoch" in rows and len(rows["epoch"]):
                self.epoch = int(rows["epoch"][-1])
            return rows
        raise RuntimeError(
            f"the training data gave this worker no full micro-batch of {self.batch_size} rows: "
            "too few rows for train.batch_size over the workers"
        )
