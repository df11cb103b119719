"""What a long measurement has done so far, kept on disk so a killed run resumes where it stopped.

The full protocol's teacher rows take hours on a CPU (the 50-step guided row alone is 100 network
calls for each of 10,000 images), longer than a session may run. ``RowProgress`` keeps, in one
folder per protocol:

- every finished row (``rows/<sampler>.json``): a resumed run does not measure it again;
- within the row being measured, every finished batch of images with the seconds it took and the
  random generator's state after it (``batches/<sampler>/<index>.pt``): a resumed run loads them and
  goes on from the next batch with the same noise, so the row is the one an uninterrupted run gives.

Every file is written to a temporary name and moved into place, so a kill leaves no half-written
batch. A folder measured for another teacher or protocol (``key.json``) is refused by name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from workers.data.storage import atomic_write
from workers.eval.protocol import Row
from workers.eval.samplers import Sampler


class StaleProgress(RuntimeError):
    """The progress folder belongs to another teacher or protocol."""


class RowProgress:
    """Finished rows and batches of one protocol, under ``folder``."""

    def __init__(self, folder: str | Path, key: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if key_file.is_file():
            kept = json.loads(key_file.read_text())
            if kept != key:
                differ = sorted(k for k in set(kept) | set(key) if kept.get(k) != key.get(k))
                raise StaleProgress(
                    f"{self.folder} holds progress of another measurement ({', '.join(differ)} differ); "
                    "remove it or give another folder"
                )
        else:
            atomic_write(key_file, lambda tmp: tmp.write_text(json.dumps(key, indent=1)))

    def _row_file(self, sampler: Sampler) -> Path:
        return self.folder / "rows" / f"{sampler.key}.json"

    def _batch_dir(self, sampler: Sampler) -> Path:
        return self.folder / "batches" / sampler.key

    def row(self, sampler: Sampler) -> Row | None:
        """The finished row of ``sampler``, or ``None``."""
        path = self._row_file(sampler)
        return Row.from_dict(json.loads(path.read_text())) if path.is_file() else None

    def save_row(self, row: Row) -> None:
        """Keep a finished row; its batches are no longer needed."""
        path = self._row_file(row.sampler)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(row.to_dict(), indent=1)))
        shutil.rmtree(self._batch_dir(row.sampler), ignore_errors=True)

    def batches(self, sampler: Sampler) -> tuple[list[Tensor], list[float | None], torch.Tensor | None]:
        """The finished batches of ``sampler``'s row in order: images, seconds (``None`` for a short
        batch), and the generator state after the last one (``None`` when there is none)."""
        folder = self._batch_dir(sampler)
        images, seconds, state = [], [], None
        for index in range(10**9):
            path = folder / f"{index:06d}.pt"
            if not path.is_file():
                break
            saved = torch.load(path, weights_only=True)
            images.append(saved["images"])
            seconds.append(None if saved["seconds"] < 0 else float(saved["seconds"]))
            state = saved["generator_state"]
        return images, seconds, state

    def save_batch(
        self, sampler: Sampler, index: int, images: Tensor, seconds: float | None, generator_state: Tensor
    ) -> None:
        folder = self._batch_dir(sampler)
        folder.mkdir(parents=True, exist_ok=True)
        body = {
            "images": images.detach().cpu(),
            "seconds": -1.0 if seconds is None else float(seconds),
            "generator_state": generator_state,
        }
        atomic_write(folder / f"{index:06d}.pt", lambda tmp: torch.save(body, tmp))
