"""The job file's ``train`` and ``resources`` sections, and ``TrainJob``: every section a training run
reads, composed (what the Ray Train workers receive; the orchestrator's ``JobSpec`` adds its own).

Imports nothing heavy: validating a job file must not load torch or Ray.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from workers.add.config import DiscriminatorSpec, LossSpec, StudentSpec, TeacherSpec
from workers.config import Section, Seed, Text
from workers.data.config import DataSpec, StorageSpec
from workers.data.storage import StringMap
from workers.secrets import check_secrets

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TrainSpec(Section):
    steps: int = Field(1000, ge=1, description="ADD iterations")
    batch_size: int = Field(32, ge=2, description="global batch (all workers); ≥ 2 per head for the hinge loss")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr_student: float = Field(1e-5, gt=0, description="AdamW learning rate of θ (at step 0 when it decays)")
    lr_student_final: float | None = Field(
        None,
        gt=0,
        description="θ's learning rate after the decay (ours; None: constant): a cosine from lr_student down to "
        "it over lr_student_decay_steps, then held (it did not let the heads catch up: docs/balance.md)",
    )
    lr_student_decay_steps: int | None = Field(
        None, ge=1, description="steps of that decay (None: all of train.steps)"
    )
    lr_discriminator: float = Field(2e-5, gt=0, description="AdamW learning rate of the heads φ")
    discriminator_steps: int = Field(
        1,
        ge=1,
        description="updates of the heads φ per student update (ours; the paper: 1): each extra one on a fresh "
        "real batch and a fresh student sample",
    )
    adam_betas: tuple[float, float] = Field((0.0, 0.99), description="AdamW betas for both optimizers")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip gradients to this total norm")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the student with this decay")
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    seed: Seed = Field(0, description="seed of everything random")
    log_every: int = Field(10, ge=1, description="report metrics every this many steps")
    checkpoint_every: int = Field(100, ge=1, description="checkpoint every this many steps")
    keep_checkpoints: int | None = Field(3, ge=1, description="checkpoints kept in storage (None: all)")
    sample_every: int = Field(200, ge=1, description="log a sample grid every this many steps")
    sample_prompts: list[Text] = Field(default_factory=list, description="captions of the sample grids")

    @model_validator(mode="after")
    def _decay(self):
        if self.lr_student_decay_steps is not None and self.lr_student_final is None:
            raise ValueError("lr_student_decay_steps needs lr_student_final (the rate it decays to)")
        return self

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each beta must be in [0, 1) (got {list(v)})")
        return v


class ResourcesSpec(Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker reserves")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs each worker reserves")
    data_cpus: float = Field(1, ge=0, description="CPUs left for Ray Data (reading, decoding, embedding)")
    fsdp: bool = Field(True, description="shard the student (and the frozen teacher) with FSDP2")
    max_failures: int = Field(2, ge=0, description="worker failures survived by restarting from a checkpoint")


def _environment(values: dict[str, str]) -> dict[str, str]:
    """The ``env`` section: variable names only, secrets only as references."""
    for key in values:
        if not ENV_NAME.match(key):
            raise ValueError(f"env.{key}: not a valid environment variable name (letters, digits, _)")
    return check_secrets(values, "env")


class TrainJob(Section):
    """One ADD training run: what to distil, on what data, with which resources, stored where."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="job name (lowercase, - _ .)")]
    teacher: TeacherSpec = Field(description="the pretrained diffusion model ψ to distil")
    student: StudentSpec = Field(default_factory=StudentSpec, description="the student θ")
    discriminator: DiscriminatorSpec = Field(default_factory=DiscriminatorSpec, description="D: frozen F + heads")
    loss: LossSpec = Field(default_factory=LossSpec, description="the ADD objective")
    data: DataSpec = Field(description="the image-caption shards")
    train: TrainSpec = Field(default_factory=TrainSpec, description="optimisation, logging and checkpoints")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Ray Train workers")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="checkpoints and exports")
    env: StringMap(_environment) = Field(
        default_factory=dict, description="environment of the workers; secrets only as ${env:NAME} references"
    )

    @model_validator(mode="after")
    def _batch_divides(self):
        per_step = self.resources.num_workers * self.train.grad_accum
        if self.train.batch_size % per_step:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} must be a multiple of resources.num_workers × "
                f"train.grad_accum = {per_step}"
            )
        return self

    def localized(self, cwd: Path | None = None):
        """This job with its relative local paths made absolute against ``cwd`` (default: here): Ray's
        workers, a Tune trial and a cluster's job run in other working directories than the driver."""
        data = self.model_dump(mode="json")
        self._localize(data, cwd or Path.cwd())
        return type(self).model_validate(data)

    def _localize(self, data: dict, cwd: Path) -> None:
        data["data"]["uri"] = absolute_path(self.data.uri, cwd)
        data["storage"]["uri"] = absolute_path(self.storage.uri, cwd)
        data["teacher"]["source"] = absolute_path(self.teacher.source, cwd, must_exist=True)  # else a hub id
        data["discriminator"]["dinov2"] = absolute_path(self.discriminator.dinov2, cwd, must_exist=True)

    def training_dump(self) -> dict:
        """The sections of ``TrainJob`` as JSON values: what the driver sends its Ray Train workers."""
        return self.model_dump(mode="json", include=set(TrainJob.model_fields))


def absolute_path(uri: str, cwd: Path, must_exist: bool = False) -> str:
    """A relative local path as an absolute one under ``cwd``; URIs, absolute paths and (with
    ``must_exist``) names that are no local path there (a hub id) stay as they are."""
    if "://" in uri or os.path.isabs(uri) or (must_exist and not (cwd / uri).exists()):
        return uri
    return str((cwd / uri).resolve())
