"""The job file's ``eval`` section (with its optional ``table``): what ``workers.eval.Evaluator`` and
``workers.eval.table.TableEvaluator`` sample, time and score after training.

Imports nothing heavy: validating a job file must not load torch.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from workers.config import ModelSource, Section, Seed, Text
from workers.data.storage import StorageUri
from workers.eval.samplers import SYNTAX, Sampler

DEFAULT_TEACHER_SAMPLERS = (
    "ddim:50", "ddim:25", "ddim:8", "ddim:4", "ddim:2", "ddim:1",
    "dpmpp:25", "dpmpp:8", "dpmpp:4", "dpmpp:2", "dpmpp:1",
)  # fmt: skip
FACTORY_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TableSpec(Section):
    """The benchmark table (``workers.eval.table``): every sampler row measured by one protocol."""

    num_images: int = Field(10_000, ge=8, description="images generated per sampler row (prompts cycled)")
    batch_size: int = Field(256, ge=1, description="images per timed call (the speed columns), and per generation call")
    generation_batch_size: int | None = Field(
        None,
        ge=1,
        description="images per generation call when not batch_size (a CPU's fastest); speed stays at batch_size",
    )
    teacher_samplers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEACHER_SAMPLERS),
        description="teacher rows as solver:steps (ddim or dpmpp; euler or flow-dpmpp for a flow teacher), "
        "all with eval.guidance_scale",
    )
    student_steps: list[int] = Field(default_factory=lambda: [1, 2, 4], description="student rows (steps)")
    reference_sampler: str = Field("ddim:50", description="the teacher row every speed-up is relative to")
    teacher_rows: Text | None = Field(
        None, description="shipped teacher rows (JSON, measured once); null: measure the teacher rows in the job"
    )
    reference_uri: StorageUri | None = Field(None, description="real images for FID and recall (default: data.uri)")
    reference_images: int = Field(10_000, ge=8, description="real images read from reference_uri")
    grid_prompts: list[Text] = Field(default_factory=list, description="rows of samples.png (default: 10 prompts)")
    alignment_name: str = Field("alignment", min_length=1, description="the alignment column's name in the table")
    k: int = Field(3, ge=1, description="neighbourhood size of precision and recall")
    results_dir: Text | None = Field(None, description="also write table.md/json and the PNGs to this local folder")

    @field_validator("teacher_samplers", "reference_sampler")
    @classmethod
    def _samplers(cls, v):
        for text in [v] if isinstance(v, str) else v:
            try:
                teacher = Sampler.parse(text).model == "teacher"
            except ValueError:
                teacher = False
            if not teacher:
                raise ValueError(f"{text!r}: a teacher sampler is one of {SYNTAX}")
        return v

    @field_validator("student_steps")
    @classmethod
    def _steps(cls, v):
        if not v or any(n < 1 for n in v):
            raise ValueError(f"must be a non-empty list of step counts ≥ 1 (got {v})")
        return v


class EvalSpec(Section):
    """The student against its teacher after training (``workers.eval.Evaluator``); never used in training."""

    prompts: list[Text] = Field(
        default_factory=list, description="eval prompts, held out from training (default: train.sample_prompts)"
    )
    images_per_prompt: int = Field(4, ge=1, description="samples per prompt and sampler for FID and alignment")
    student_steps: int = Field(1, ge=1, le=1000, description="the student's sampling steps")
    teacher_steps: int = Field(50, ge=1, le=1000, description="the teacher's reference sampler steps")
    teacher_solver: Literal["ddim", "dpmpp", "euler", "flow-dpmpp"] = Field(
        "ddim", description="the teacher's reference sampler (euler or flow-dpmpp for a flow-matching teacher)"
    )
    guidance_scale: float = Field(5.0, ge=1, description="the teacher's classifier-free guidance scale")
    batch_size: int = Field(32, ge=1, description="images per sampling call")
    seed: Seed = Field(0, description="noise of both samplers (the same for student and teacher)")
    speed_batch_size: int = Field(8, ge=1, description="images per timed call")
    speed_warmup: int = Field(1, ge=0, description="untimed calls before timing")
    speed_repeats: int = Field(3, ge=1, description="timed calls; the median counts (at least 3 with a table)")
    features: str = Field("inception", description="FID feature network: inception, none, or package.module:factory")
    scorer: str = Field("clip", description="prompt-alignment scorer: clip, none, or package.module:factory")
    clip_model: ModelSource | None = Field(None, description="CLIP path or hub id (scorer: clip; default: ViT-B/32)")
    table: TableSpec | None = Field(None, description="measure the benchmark table instead of one comparison")

    @field_validator("features", "scorer")
    @classmethod
    def _named_or_factory(cls, v, info):
        builtin = {"features": "inception", "scorer": "clip"}[info.field_name]
        if v not in (builtin, "none") and not FACTORY_REF.match(v):
            raise ValueError(f"must be {builtin}, none, or a factory as package.module:name (got {v!r})")
        return v

    @model_validator(mode="after")
    def _table_protocol(self):
        table = self.table
        if table is not None and table.num_images < 2 * table.k + 2:
            raise ValueError(f"eval.table.num_images: {table.num_images} is too few for FID and k={table.k} recall")
        if table is not None and self.speed_repeats < 3:
            raise ValueError(
                f"eval.speed_repeats: the table's speed columns are the median of at least 3 timed calls "
                f"(got {self.speed_repeats})"
            )
        return self
