"""The benchmark protocol: every sampler of the table measured the same way.

A row is one sampler (the teacher's DDIM or DPM-Solver++ with classifier-free guidance at some
number of steps, or the student at 1, 2, 4 steps). For each, ``num_images`` images are generated
from the prompts (cycled, so every prompt gets the same share), with the same seed for every
sampler, and scored in one feature space against the reference (real) images:

- FID: Fréchet distance of the Gaussians fitted to generated and reference features;
- alignment: the mean of the prompt scorer (class accuracy for Fashion-MNIST, CLIP score for SD);
- precision / recall: improved precision and recall, k = 3, in the same feature space;
- ms/image: generation timed at ``batch_size`` images per call, warmed up, the median of at least
  ``speed_repeats`` calls, all samplers in one process with the same threads.

Never used in training.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from workers.console import progress_stream
from workers.eval.alignment import PromptScorer
from workers.eval.features import FeatureExtractor
from workers.eval.frechet import FeatureStats, frechet_distance
from workers.eval.manifold import precision_recall
from workers.eval.samplers import Sampler
from workers.eval.speed import _sync

if TYPE_CHECKING:
    from workers.eval.config import EvalSpec
    from workers.eval.progress import RowProgress

Generate = Callable[[list, torch.Generator], Tensor]  # (prompts, generator) -> images (N, C, H, W) in [0, 1]


@dataclass
class Row:
    """One measured row of the table."""

    sampler: Sampler
    num_images: int
    fid: float
    alignment: float
    precision: float
    recall: float
    ms_per_image: float
    speedup: float | None = None  # vs the reference sampler's ms/image (filled in by the table)
    timing: dict = field(default_factory=dict)  # batch size, repeats, where it was timed

    @property
    def images_per_s(self) -> float:
        return 1000.0 / self.ms_per_image

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "sampler"}
        return {"sampler": asdict(self.sampler), "family": self.sampler.family, "nfe": self.sampler.nfe} | out | {
            "images_per_s": self.images_per_s
        }

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        names = {"num_images", "fid", "alignment", "precision", "recall", "ms_per_image", "speedup", "timing"}
        return cls(sampler=Sampler(**d["sampler"]), **{k: v for k, v in d.items() if k in names})


class Protocol:
    """Measures rows against fixed reference features; ``features`` and ``scorer`` are injected
    (the Fashion-MNIST classifier; Inception and CLIP for SD-class jobs).

    How every row is measured (the same for teacher and student rows, so they compare) is the job's
    ``eval`` section: ``eval.table``'s ``num_images``, ``batch_size``, ``generation_batch_size`` and
    ``k``, and ``eval``'s ``prompts`` (cycled to ``num_images``), ``seed`` (the same initial noise for
    every sampler) and ``speed_repeats``.
    """

    def __init__(
        self,
        config: EvalSpec,
        features: FeatureExtractor,
        scorer: PromptScorer | None,
        reference: Tensor,
        feature_batch_size: int = 500,
    ):
        if not config.prompts:
            raise ValueError("the benchmark needs at least one prompt")
        if config.table is None:
            raise ValueError("the benchmark protocol is the eval.table section, and the job has none")
        self.config, self.table, self.features, self.scorer = config, config.table, features, scorer
        self.feature_batch_size = feature_batch_size
        self.reference_features = self._features(reference)
        self.reference_stats = FeatureStats.of(self.reference_features)

    @property
    def generation_size(self) -> int:
        """Images per generation call: ``generation_batch_size`` (a CPU's fastest), else ``batch_size``."""
        return self.table.generation_batch_size or self.table.batch_size

    def all_prompts(self) -> list:
        """The prompts cycled to ``num_images``: each gets the same share."""
        prompts = self.config.prompts
        return [prompts[i % len(prompts)] for i in range(self.table.num_images)]

    def _features(self, images: Tensor) -> Tensor:
        return torch.cat([self.features(chunk) for chunk in images.split(self.feature_batch_size)]).float()

    def score(self, images: Tensor, prompts: list) -> dict[str, float]:
        """FID, alignment, precision and recall of ``images`` generated from ``prompts``."""
        feats = self._features(images)
        out = {"fid": frechet_distance(FeatureStats.of(feats), self.reference_stats)}
        out["alignment"] = float(self.scorer(images, prompts).float().mean()) if self.scorer else float("nan")
        return out | precision_recall(self.reference_features, feats, self.table.k)

    def generate(
        self, sampler: Sampler, generate: Generate, progress: RowProgress | None = None
    ) -> tuple[Tensor, list[float]]:
        """All ``num_images`` images of one sampler, and the seconds each full batch took; with
        ``progress``, finished batches are kept and a resumed call starts after the last of them."""
        prompts, size = self.all_prompts(), self.generation_size
        generator = torch.Generator().manual_seed(self.config.seed)
        images, seconds, state = progress.batches(sampler) if progress else ([], [], None)
        if state is not None:
            generator.set_state(state)
        done = len(images)
        starts = range(done * size, len(prompts), size)
        bar = tqdm(starts, desc=f"evaluating {sampler.key}", file=progress_stream(), dynamic_ncols=True)
        for index, i in enumerate(bar, start=done):
            batch = prompts[i : i + size]
            _sync()
            start = time.perf_counter()
            images.append(generate(batch, generator))
            _sync()
            seconds.append(time.perf_counter() - start if len(batch) == size else None)
            if progress:
                progress.save_batch(sampler, index, images[-1], seconds[-1], generator.get_state())
        return torch.cat(images), [s for s in seconds if s is not None]

    def speed(self, generate: Generate, seconds: Sequence[float] = (), label: str = "") -> tuple[float, dict]:
        """ms/image at ``batch_size``: the generation's own full batches after the first (warm-up) when
        they were of ``batch_size`` and there are at least ``speed_repeats`` of them, else that many
        extra timed calls after a warm-up (a progress bar named ``label`` when given)."""
        size, repeats = self.table.batch_size, self.config.speed_repeats
        timed = list(seconds[1:]) if self.generation_size == size else []
        if len(timed) < repeats:
            prompts = (self.all_prompts() * size)[:size]
            generator = torch.Generator().manual_seed(self.config.seed)
            timed = []
            bar = tqdm(total=repeats + 1, desc=f"timing {label}", file=progress_stream(), disable=not label)
            with torch.inference_mode(), bar:
                generate(prompts, generator)  # warm-up
                bar.update()
                for _ in range(repeats):
                    _sync()
                    start = time.perf_counter()
                    generate(prompts, generator)
                    _sync()
                    timed.append(time.perf_counter() - start)
                    bar.update()
        ms = 1000 * statistics.median(timed) / size
        return ms, {"batch_size": size, "repeats": len(timed), "threads": torch.get_num_threads()}

    def measure(self, sampler: Sampler, generate: Generate, progress: RowProgress | None = None) -> Row:
        """One row: generate, score, time (with ``progress``: a row finished before is read back)."""
        if progress and (row := progress.row(sampler)) is not None:
            return row
        images, seconds = self.generate(sampler, generate, progress)
        metrics = self.score(images, self.all_prompts())
        ms, timing = self.speed(generate, seconds)
        row = Row(sampler, len(images), ms_per_image=ms, timing=timing, **metrics)
        if progress:
            progress.save_row(row)
        return row


def with_speedups(rows: Sequence[Row], reference_ms: float) -> list[Row]:
    """Fill each row's speed-up against the reference sampler's ms/image."""
    for row in rows:
        row.speedup = reference_ms / row.ms_per_image
    return list(rows)
