"""The evaluator: the student (few steps) against its teacher (reference sampler, N steps with CFG).

For the job's eval prompts it samples both, then reports

- ``student_fid``, ``teacher_fid``: Fréchet distance of each to the reference images (real data)
  in the injected feature space, and ``fid_ratio`` = student / teacher; without reference images,
  ``student_teacher_fd`` (student against teacher samples) instead;
- ``student_alignment``, ``teacher_alignment``: the mean score of the injected prompt scorer;
- ``student_ms_per_image``, ``teacher_ms_per_image`` and ``speedup``: timed in this process, warmed
  up, median of at least 3 repeats, same batch of prompts;
- whatever each extra ``ImageMetric`` returns (a classifier's recall, say), given all samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from workers.add.components import load_teacher
from workers.add.export import load_student
from workers.add.student import Student
from workers.add.teacher import Teacher
from workers.eval.alignment import PromptScorer
from workers.eval.config import EvalSpec
from workers.eval.features import FeatureExtractor
from workers.eval.frechet import FeatureStats, frechet_distance
from workers.eval.images import batched, image_grid, student_images, teacher_images
from workers.eval.speed import ms_per_image


@dataclass
class Samples:
    """Everything sampled for one evaluation, images (N, C, H, W) in [0, 1]."""

    prompts: list  # the prompt of each student and teacher image
    student: Tensor
    teacher: Tensor
    reference: Tensor | None = None  # real images, when given


ImageMetric = Callable[[Samples], dict[str, float]]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: Samples = field(repr=False)
    config: EvalSpec | None = None  # the eval section as measured (the teacher's defaults filled in)

    def comparison_grid(self, max_prompts: int = 8):
        """A PNG-ready grid: one row per prompt (first image of each), teacher left, student right."""
        seen, rows = set(), []
        for i, prompt in enumerate(self.samples.prompts):
            if prompt not in seen and len(seen) < max_prompts:
                seen.add(prompt)
                rows += [self.samples.teacher[i], self.samples.student[i]]
        return image_grid(torch.stack(rows), columns=2)


class Evaluator:
    """Student-vs-teacher evaluation with an injected feature space and prompt scorer (either may be
    ``None`` to skip that metric) and optional extra metrics."""

    def __init__(
        self,
        features: FeatureExtractor | None,
        scorer: PromptScorer | None = None,
        extra_metrics: Sequence[ImageMetric] = (),
        feature_batch_size: int = 64,
    ):
        self.features, self.scorer, self.extra_metrics = features, scorer, list(extra_metrics)
        self.feature_batch_size = feature_batch_size

    def evaluate_paths(
        self,
        student_path: str | Path,
        teacher_source: str | Path,
        config: EvalSpec,
        reference: Tensor | None = None,
        **teacher_kwargs,
    ) -> EvalResult:
        """Load an exported student and its teacher (``load_teacher`` keyword arguments pass through)."""
        student, parts = load_student(student_path)
        return self.evaluate(student, parts, load_teacher(str(teacher_source), **teacher_kwargs), config, reference)

    @torch.no_grad()
    def evaluate(
        self, student: Student, parts: Teacher, teacher: Teacher, config: EvalSpec, reference: Tensor | None = None
    ) -> EvalResult:
        """Sample, score and time the student (with the frozen ``parts`` it was exported with) and the teacher;
        ``config.prompts`` are captions (or labels for class-conditioned teachers)."""
        if not config.prompts:
            raise ValueError("the evaluation needs at least one prompt")
        config = config.for_teacher(teacher.schedule.is_flow)  # the teacher's own solver by default
        prompts = [p for p in config.prompts for _ in range(config.images_per_prompt)]

        def sample_student(batch: list) -> Tensor:
            return student_images(student, parts, batch, config.student_steps, generator)

        def sample_teacher(batch: list) -> Tensor:
            return teacher_images(
                teacher, batch, config.teacher_steps, config.guidance_scale, config.teacher_solver, generator
            )

        generator = torch.Generator().manual_seed(config.seed)
        rows = f"student-add-{config.student_steps}", f"teacher-{config.teacher_solver}-{config.teacher_steps}"
        student_x = batched(sample_student, prompts, config.batch_size, f"evaluating {rows[0]}")
        generator = torch.Generator().manual_seed(config.seed)  # the same noise for the teacher
        teacher_x = batched(sample_teacher, prompts, config.batch_size, f"evaluating {rows[1]}")
        samples = Samples(prompts, student_x, teacher_x, reference)

        metrics = {"num_images": float(len(prompts))}
        metrics |= self._frechet(samples)
        if self.scorer is not None:
            metrics["student_alignment"] = float(self.scorer(student_x, prompts).float().mean())
            metrics["teacher_alignment"] = float(self.scorer(teacher_x, prompts).float().mean())

        timed = (prompts * config.speed_batch_size)[: config.speed_batch_size]
        speed = {"warmup": config.speed_warmup, "repeats": config.speed_repeats}
        metrics["student_ms_per_image"] = ms_per_image(lambda n: sample_student(timed[:n]), len(timed), **speed)
        metrics["teacher_ms_per_image"] = ms_per_image(lambda n: sample_teacher(timed[:n]), len(timed), **speed)
        metrics["speedup"] = metrics["teacher_ms_per_image"] / metrics["student_ms_per_image"]
        for metric in self.extra_metrics:
            metrics |= {k: float(v) for k, v in metric(samples).items()}
        return EvalResult(metrics, samples, config)

    def _features(self, images: Tensor) -> FeatureStats:
        return FeatureStats.of(batched(self.features, images, self.feature_batch_size))

    def _frechet(self, samples: Samples) -> dict[str, float]:
        if self.features is None:
            return {}
        student, teacher = self._features(samples.student), self._features(samples.teacher)
        if samples.reference is None:
            return {"student_teacher_fd": frechet_distance(student, teacher)}
        reference = self._features(samples.reference)
        out = {"student_fid": frechet_distance(student, reference), "teacher_fid": frechet_distance(teacher, reference)}
        out["fid_ratio"] = out["student_fid"] / max(out["teacher_fid"], 1e-12)
        return out
