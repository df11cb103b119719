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
# a flow-matching teacher's (SD3, FLUX, Sana): its pipelines' Euler, and DPM-Solver++ on flow sigmas
DEFAULT_FLOW_TEACHER_SAMPLERS = (
    "euler:50", "euler:28", "euler:8", "euler:4", "euler:2", "euler:1",
    "flow-dpmpp:20", "flow-dpmpp:8", "flow-dpmpp:4", "flow-dpmpp:2", "flow-dpmpp:1",
)  # fmt: skip
OWN_SOLVER = {False: "ddim", True: "euler"}  # a teacher's own reference solver, by whether it is flow-matching
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
    teacher_samplers: list[str] | None = Field(
        None,
        description="teacher rows as solver:steps (ddim or dpmpp; euler or flow-dpmpp for a flow teacher), all with "
        "eval.guidance_scale (default: the teacher's own: DDIM and DPM-Solver++ rows, or Euler and flow "
        "DPM-Solver++ rows for a flow-matching teacher)",
    )
    student_steps: list[int] = Field(default_factory=lambda: [1, 2, 4], description="student rows (steps)")
    reference_sampler: str | None = Field(
        None, description="the teacher row every speed-up is relative to (default: ddim:50; euler:50, flow teacher)"
    )
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
        for text in [] if v is None else [v] if isinstance(v, str) else v:
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
    teacher_solver: Literal["ddim", "dpmpp", "euler", "flow-dpmpp"] | None = Field(
        None,
        description="the teacher's reference sampler: ddim or dpmpp for a DDPM teacher, euler or flow-dpmpp for a "
        "flow-matching one (default: the teacher's own, ddim or euler)",
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

    def for_teacher(self, flow: bool) -> EvalSpec:
        """This section with the teacher's own defaults filled in (``flow``: a flow-matching teacher): the
        reference solver, the table's teacher rows and its reference row."""
        solver = self.teacher_solver or OWN_SOLVER[flow]
        table = self.table
        if table is not None:
            defaults = DEFAULT_FLOW_TEACHER_SAMPLERS if flow else DEFAULT_TEACHER_SAMPLERS
            table = table.model_copy(
                update={
                    "teacher_samplers": list(table.teacher_samplers or defaults),
                    "reference_sampler": table.reference_sampler or f"{OWN_SOLVER[flow]}:50",
                }
            )
        return self.model_copy(update={"teacher_solver": solver, "table": table})

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
