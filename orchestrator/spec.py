"""The job spec: a job YAML mapped onto typed models, one line of help per field.

Unknown keys are errors; every error names the field's path, what was wrong and what is allowed
(see ``orchestrator/errors.py`` for how they are reported). Secrets appear only as references
``${env:NAME}``, resolved on the workers, never logged or stored.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SECRET_REF = re.compile(r"^\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}$")
SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY)", re.IGNORECASE)


class Section(BaseModel):
    """Base of every section: unknown keys are rejected, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_secrets(values: dict[str, str], where: str) -> dict[str, str]:
    """Values under secret-looking names must be ``${env:NAME}`` references, never clear text."""
    for key, value in values.items():
        if SECRET_NAME.search(key) and not SECRET_REF.match(str(value)):
            raise ValueError(f"{where}.{key} looks like a secret: give it as a reference like ${{env:{key.upper()}}}")
    return values


class TeacherSpec(Section):
    source: str = Field(description="diffusers folder (local path) or hub id of the teacher ψ")
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = Field(
        None, description="override the scheduler's prediction type"
    )
    resolution: int | None = Field(None, ge=8, description="SDXL micro-conditioning resolution (default: the UNet's)")


class StudentSpec(Section):
    steps: int = Field(4, ge=1, le=1000, description="N, the number of student timesteps (trailing spacing)")
    timesteps: list[int] | None = Field(None, description="explicit T_student instead of `steps` (largest first)")
    zero_terminal_snr: bool = Field(True, description="rescale the betas so τ1 = T−1 is pure noise")
    lora_rank: int | None = Field(None, ge=1, description="train LoRA adapters of this rank instead of the full UNet")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: the rank)")


class DiscriminatorSpec(Section):
    backbone: Literal["teacher", "dinov2"] = Field(
        "teacher", description="frozen F: the teacher (LADD) or DINOv2 (ADD)"
    )
    dinov2: str = Field("facebook/dinov2-small", description="DINOv2 path or hub id (backbone: dinov2)")
    taps: list[int] | list[str] | None = Field(None, description="tapped layers (default: spread evenly)")
    cmap_dim: int = Field(64, ge=1, description="dimension of the projection-conditioning map")
    image_conditioning: bool = Field(False, description="also condition on the real image's CLS embedding")
    augment_policy: str | None = Field(None, description="DiffAugment ops, e.g. 'color,translation,cutout'")
    resolution: int | None = Field(224, ge=14, description="DINOv2 input resolution")


class LossSpec(Section):
    weighting: Literal["exponential", "sds", "nfsd"] = Field("exponential", description="distillation c(t)")
    lambda_distill: float = Field(2.5, ge=0, description="λ, weight of the distillation loss")
    lambda_adv: float = Field(1.0, ge=0, description="weight of the adversarial loss L_G")
    guidance_scale: float = Field(3.0, ge=1, description="teacher CFG scale in the distillation target")
    gamma_r1: float = Field(1e-5, ge=0, description="γ, weight of R1 at the heads' inputs")
    r1_interval: int = Field(1, ge=1, description="apply R1 every this many D steps (lazy)")
    distill_space: Literal["pixel", "latent"] = Field("pixel", description="distance for latent teachers")
    sds_w: Literal["uniform", "snr"] = Field("uniform", description="w(t) of the sds/nfsd weightings")

    @model_validator(mode="after")
    def _some_loss(self):
        if self.lambda_distill == 0 and self.lambda_adv == 0:
            raise ValueError("lambda_distill and lambda_adv are both 0: nothing to train")
        return self


class DataSpec(Section):
    uri: str = Field(description="shards: s3://bucket/prefix, file:///path, gs://..., or a local path")
    format: Literal["parquet", "webdataset"] = Field("parquet", description="shard format")
    resolution: int = Field(32, ge=8, description="images are resized and centre-cropped to this size")
    channels: Literal[1, 3] = Field(3, description="image channels the model takes")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="fail when more records than this are bad")
    shuffle_seed: int = Field(0, description="seed of the per-epoch file and local shuffles")
    local_shuffle_buffer: int = Field(256, ge=0, description="rows in Ray Data's local shuffle buffer")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="endpoint_url, region; credentials only as ${env:NAME}"
    )

    @field_validator("storage_options")
    @classmethod
    def _no_clear_secrets(cls, v):
        return check_secrets(v, "data.storage_options")


class TrainSpec(Section):
    steps: int = Field(1000, ge=1, description="ADD iterations")
    batch_size: int = Field(32, ge=2, description="global batch (all workers); ≥ 2 per head for the hinge loss")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr_student: float = Field(1e-5, gt=0, description="AdamW learning rate of θ")
    lr_discriminator: float = Field(2e-5, gt=0, description="AdamW learning rate of the heads φ")
    adam_betas: tuple[float, float] = Field((0.0, 0.99), description="AdamW betas for both optimizers")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip gradients to this total norm")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the student with this decay")
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    seed: int = Field(0, description="seed of everything random")
    log_every: int = Field(10, ge=1, description="report metrics every this many steps")
    checkpoint_every: int = Field(100, ge=1, description="checkpoint every this many steps")
    sample_every: int = Field(200, ge=1, description="log a sample grid every this many steps")
    sample_prompts: list[str] = Field(default_factory=list, description="captions of the sample grids")


class ResourcesSpec(Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker reserves")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs each worker reserves")
    data_cpus: float = Field(1, ge=0, description="CPUs left for Ray Data (reading, decoding, embedding)")
    fsdp: bool = Field(True, description="shard the student (and the frozen teacher) with FSDP2")
    max_failures: int = Field(2, ge=0, description="worker failures survived by restarting from a checkpoint")


class StorageSpec(Section):
    uri: str = Field("runs", description="where checkpoints and exports go: a local folder or s3://bucket/prefix")
    options: dict[str, str] = Field(default_factory=dict, description="endpoint_url, region; secrets as ${env:NAME}")

    @field_validator("options")
    @classmethod
    def _no_clear_secrets(cls, v):
        return check_secrets(v, "storage.options")


class TrackingSpec(Section):
    uri: str | None = Field(None, description="MLflow tracking URI (default: the embedded local store)")
    experiment: str = Field("add", description="MLflow experiment")
    model_name: str | None = Field(None, description="registered model name (default: the job's name)")


class JobSpec(Section):
    """One ADD job: what to distil, on what data, with which resources, tracked where."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="job name (lowercase, - _ .)")]
    teacher: TeacherSpec
    student: StudentSpec = Field(default_factory=StudentSpec)
    discriminator: DiscriminatorSpec = Field(default_factory=DiscriminatorSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    env: dict[str, str] = Field(default_factory=dict, description="environment for the workers; secrets as ${env:NAME}")

    @field_validator("env")
    @classmethod
    def _no_clear_secrets(cls, v):
        return check_secrets(v, "env")

    @model_validator(mode="after")
    def _batch_divides(self):
        per_step = self.resources.num_workers * self.train.grad_accum
        if self.train.batch_size % per_step:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} must be a multiple of resources.num_workers × "
                f"train.grad_accum = {per_step}"
            )
        return self
