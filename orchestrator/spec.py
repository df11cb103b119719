"""The job spec: a job YAML mapped onto typed models, one line of help per field.

Unknown keys are errors; every error names the field's path, what was wrong and what is allowed
(``orchestrator/errors.py`` maps pydantic's errors onto paths). ``load_job(path, overrides)`` reads
a file, applies ``--set key=value`` overrides and validates; ``JobSpec.model_json_schema()`` is what
``addctl schema`` prints and what the README's job-file reference is generated from.

Secrets appear only as references ``${env:NAME}``, and only where they are resolved: in ``env``,
``storage.options`` and ``data.storage_options``. A reference is resolved where the job runs (the
driver and each worker, ``resolve_secrets``; a submitted job's ``env`` travels only in its job.yaml,
see ``orchestrator/jobs.py``), so the value is never in the job file, the job's submission, a log or
an MLflow run. Clear-text secrets are rejected anywhere in the job, the sweep included: a
secret-looking key with a literal value, or a value shaped like a credential
(``workers.secrets.CLEAR_SECRETS``: URL user-info and query tokens, connection-string keys, AWS key
ids, private keys, API tokens). Malformed references and shell-style ``${...}`` are rejected too.

Bounds (hostile input must fail fast, with exit 2): a job file is at most ``MAX_JOB_BYTES`` of
UTF-8, ``MAX_DEPTH`` levels and ``MAX_VALUES`` values, and its aliases expand to at most
``MAX_EXPANDED``; floats are finite, seeds in [0, 2³²); local input paths must exist (``load_job``).

Sections read by other modules: ``eval`` becomes ``workers.eval.EvalConfig`` (plus ``features``,
``scorer``, ``clip_model``), ``promotion`` the ``orchestrator.promotion.Gates``, ``sweep`` the
``orchestrator.sweep.SweepConfig``; field names match theirs one for one.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.errors import JobSpecError, Problem, format_path, problems_from_validation, safe_repr
from workers import secrets
from workers.data.storage import SCHEMES as STORAGE_SCHEMES
from workers.secrets import find_clear_secret

SECRET_REF = re.compile(r"^\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}$")
SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY)", re.IGNORECASE)
DEFAULT_TEACHER_SAMPLERS = (
    "ddim:50", "ddim:25", "ddim:8", "ddim:4", "ddim:2", "ddim:1",
    "dpmpp:25", "dpmpp:8", "dpmpp:4", "dpmpp:2", "dpmpp:1",
)  # fmt: skip
FACTORY_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ANY_REF = re.compile(r"\$\{\s*env\s*:")
URI_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@")  # a URI that starts user:password@
SHELL_REF = re.compile(r"\$\{(?!env:)")  # ${HOME}, ${X:-y}: what a shell (or Ray's env_vars) would expand
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# MLflow tracking URIs: a server, a database, a folder (a bare path is a folder too).
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
SEED_MAX = 2**32 - 1  # seeds are mixed with step numbers into 64-bit generator seeds
# Where ``${env:NAME}`` references are allowed (and resolved).
REFERENCE_SECTIONS = ("env", "storage.options", "data.storage_options")
# Keys of ``storage.options`` / ``data.storage_options`` (``workers.data.storage.StorageOptions``).
STORAGE_OPTIONS = {
    "endpoint_url": str,
    "region": str,
    "profile": str,
    "anonymous": lambda v: {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[v.lower()],
    "connect_timeout": float,
    "request_timeout": float,
    "max_attempts": int,
    "retry_s": float,
}


class Section(BaseModel):
    """Base of every section: unknown keys are rejected, assignments validated, NaN and infinity refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


def _known_scheme(v: str, schemes, what: str, otherwise: str) -> str:
    """``v`` unless it is a URI whose scheme is not one of ``schemes``."""
    _not_blank(v)
    scheme = SCHEME.match(v)
    if scheme and scheme[1].lower() not in schemes:
        raise ValueError(
            f"unsupported {what} {scheme[1][:20]}://; supported: {', '.join(s + '://' for s in schemes)} or {otherwise}"
        )
    return v


def _storage_uri(v: str) -> str:
    return _known_scheme(v, STORAGE_SCHEMES, "storage scheme", "a local path")


def _model_source(v: str) -> str:
    _not_blank(v)
    if SCHEME.match(v):
        raise ValueError("a local folder or a Hugging Face hub id (org/name), not a URI")
    return v


def _tracking_uri(v: str | None) -> str | None:
    return v if v is None else _known_scheme(v, TRACKING_SCHEMES, "tracking URI scheme", "a local folder")
    _not_blank(v)
    scheme = SCHEME.match(v)
    if scheme and scheme[1].lower() not in TRACKING_SCHEMES:
        raise ValueError(
            f"unsupported tracking URI scheme {scheme[1][:20]}://; supported: "
            f"{', '.join(s + '://' for s in TRACKING_SCHEMES)} or a local folder"
        )
    return v


Text = Annotated[str, AfterValidator(_not_blank)]  # a string where empty means nothing
StorageUri = Annotated[str, AfterValidator(_storage_uri)]  # s3://, gs://, file:// or a local path
ModelSource = Annotated[str, AfterValidator(_model_source)]  # a local folder or a hub id
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class SecretError(RuntimeError):
    """A ``${env:NAME}`` reference whose variable is not set where it is resolved (names, never values)."""


def check_secrets(values: dict[str, str], where: str) -> dict[str, str]:
    """Values under secret-looking names must be ``${env:NAME}`` references, never clear text."""
    for key, value in values.items():
        if SECRET_NAME.search(key) and not SECRET_REF.match(str(value)):
            raise ValueError(
                f"{where}.{key}: looks like a secret given in clear; give a reference to a variable set "
                f"on the workers instead, e.g. ${{env:{key.upper()}}}"
            )
    return values


def scalars_as_strings(values):
    """``{"max_attempts": 5, "anonymous": true}`` -> ``{"max_attempts": "5", "anonymous": "true"}``
    (mappings of strings, written in YAML without quotes); anything else is left to validation."""
    if not isinstance(values, Mapping):
        return values
    out = {}
    for key, value in values.items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, int | float):
            value = str(value)
        out[key] = value
    return out


def check_storage_options(values: dict[str, str], where: str) -> dict[str, str]:
    """Only ``StorageOptions`` keys, with values of their type (or references); credentials go in ``env``."""
    check_secrets(values, where)
    for key, value in values.items():
        if key not in STORAGE_OPTIONS:
            raise ValueError(
                f"{where}.{key}: unknown storage option; allowed: {', '.join(STORAGE_OPTIONS)} "
                "(credentials go in `env:` as ${env:NAME} references, e.g. AWS_SECRET_ACCESS_KEY)"
            )
        if not SECRET_REF.match(value):
            try:
                STORAGE_OPTIONS[key](value)
            except (KeyError, ValueError):
                kind = "true or false" if key == "anonymous" else STORAGE_OPTIONS[key].__name__
                raise ValueError(f"{where}.{key}: must be {kind}, got {value!r}") from None
    return values


# ---- the model's parts ----------------------------------------------------------------------------


class TeacherSpec(Section):
    source: ModelSource = Field(description="diffusers folder (local path) or hub id of the teacher ψ")
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

    @field_validator("timesteps")
    @classmethod
    def _timesteps_in_range(cls, v):
        if v is not None and (not v or any(t < 0 or t > 999 for t in v) or v != sorted(set(v), reverse=True)):
            raise ValueError(f"must be distinct timesteps in [0, 999], largest first (got {v})")
        return v


class DiscriminatorSpec(Section):
    backbone: Literal["teacher", "dinov2"] = Field(
        "teacher", description="frozen F: the teacher (LADD) or DINOv2 (ADD)"
    )
    dinov2: ModelSource = Field("facebook/dinov2-small", description="DINOv2 path or hub id (backbone: dinov2)")
    taps: list[int] | list[str] | None = Field(None, description="tapped layers (default: spread evenly)")
    cmap_dim: int = Field(64, ge=1, description="dimension of the projection-conditioning map")
    image_conditioning: bool = Field(False, description="also condition on the real image's CLS embedding")
    augment_policy: str | None = Field(None, description="DiffAugment ops, e.g. 'color,translation,cutout'")
    resolution: int | None = Field(224, ge=14, description="DINOv2 input resolution")
    t_hat_loc: float = Field(
        0.0, description="teacher backbone: t̂/T = sigmoid(n), n ~ N(t_hat_loc, t_hat_scale²); lower judges finer detail"
    )
    t_hat_scale: float = Field(1.0, gt=0, description="teacher backbone: spread of the logit-normal t̂")
    text_rms: bool = Field(
        True, description="rescale the pooled text embedding to unit RMS before the heads' projection"
    )
    mix_real_fake: bool = Field(
        False, description="each batch-norm group of the heads holds real and fake samples (else one kind)"
    )


class LossSpec(Section):
    weighting: Literal["exponential", "sds", "nfsd"] = Field("exponential", description="distillation c(t)")
    lambda_distill: float = Field(
        2.5, ge=0, description="λ, weight of the distillation loss (c(t) × the mean squared error per element)"
    )
    balance: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description="λ_adv, the weight of L_G: fixed (lambda_adv) or adaptive (set each step so the two gradients "
        "at x̂θ keep the ratio adv_ratio)",
    )
    lambda_adv: float = Field(1.0, ge=0, description="balance: fixed: weight of the adversarial loss L_G")
    adv_ratio: float = Field(
        1.0, gt=0, description="balance: adaptive: ‖λ_adv·∇L_G‖ / ‖∇λ·L_distill‖ at the student's output x̂θ"
    )
    guidance_scale: float = Field(3.0, ge=1, description="teacher CFG scale in the distillation target")
    gamma_r1: float = Field(1e-5, ge=0, description="γ, weight of R1 at the heads' inputs")
    r1_interval: int = Field(1, ge=1, description="apply R1 every this many D steps (lazy)")
    distill_space: Literal["pixel", "latent"] = Field("pixel", description="distance for latent teachers")
    sds_w: Literal["uniform", "snr"] = Field("uniform", description="w(t) of the sds/nfsd weightings")

    @model_validator(mode="after")
    def _some_loss(self):
        if self.lambda_distill == 0 and self.lambda_adv == 0 and self.balance == "fixed":
            raise ValueError("loss.lambda_adv: lambda_distill and lambda_adv are both 0: nothing to train")
        if self.balance == "adaptive" and self.lambda_distill == 0:
            raise ValueError(
                "loss.balance: adaptive sets λ_adv relative to the distillation gradient, but lambda_distill is 0 "
                "(for adversarial-only training use balance: fixed)"
            )
        return self


# ---- data, training, resources ----------------------------------------------------------------


class ShardsSpec(Section):
    """Where image-caption shards are read from: their URI and the options of that storage."""

    uri: StorageUri = Field(description="shards: s3://bucket/prefix, file:///path, gs://..., or a local path")
    storage_options: dict[str, str] = Field(
        default_factory=dict,
        description="endpoint_url, region, profile, anonymous, timeouts, max_attempts; values may be ${env:NAME}",
    )

    @field_validator("storage_options", mode="before")
    @classmethod
    def _unquoted(cls, v):
        return scalars_as_strings(v)

    @field_validator("storage_options")
    @classmethod
    def _options(cls, v):
        return check_storage_options(v, "data.storage_options")


class DataSpec(ShardsSpec):
    format: Literal["parquet", "webdataset"] = Field("parquet", description="shard format")
    resolution: int = Field(32, ge=8, description="images are resized and centre-cropped to this size")
    channels: Literal[1, 3] = Field(3, description="image channels the model takes")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="fail when more records than this are bad")
    shuffle_seed: Seed = Field(0, description="seed of the per-epoch file and local shuffles")
    local_shuffle_buffer: int = Field(256, ge=0, description="rows in Ray Data's local shuffle buffer")
    embed_captions: bool = Field(
        False, description="encode captions in Ray Data (an actor pool, on GPUs if any), not on the training workers"
    )


class TrainSpec(Section):
    steps: int = Field(1000, ge=1, description="ADD iterations")
    batch_size: int = Field(32, ge=2, description="global batch (all workers); ≥ 2 per head for the hinge loss")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr_student: float = Field(1e-5, gt=0, description="AdamW learning rate of θ")
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


class StorageSpec(Section):
    uri: StorageUri = Field("runs", description="where checkpoints and exports go: a local folder or s3://bucket/prefix")
    options: dict[str, str] = Field(
        default_factory=dict, description="options of the storage (as data.storage_options); values may be ${env:NAME}"
    )

    @field_validator("options", mode="before")
    @classmethod
    def _unquoted(cls, v):
        return scalars_as_strings(v)

    @field_validator("options")
    @classmethod
    def _options(cls, v):
        return check_storage_options(v, "storage.options")


class TrackingSpec(Section):
    uri: Annotated[str | None, AfterValidator(_tracking_uri)] = Field(
        None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the embedded local store)"
    )
    experiment: str = Field("add", min_length=1, description="MLflow experiment")
    model_name: str | None = Field(None, min_length=1, description="registered model name (default: the job's name)")


# ---- evaluation, promotion, sweep -------------------------------------------------------------


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
        description="teacher rows as solver:steps (ddim or dpmpp), all with eval.guidance_scale",
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
            solver, _, steps = text.partition(":")
            if solver not in ("ddim", "dpmpp") or not steps.isdigit() or int(steps) < 1:
                raise ValueError(f"{text!r}: a teacher sampler is ddim:STEPS or dpmpp:STEPS")
        return v

    @field_validator("student_steps")
    @classmethod
    def _steps(cls, v):
        if not v or any(n < 1 for n in v):
            raise ValueError(f"must be a non-empty list of step counts ≥ 1 (got {v})")
        return v


class EvalSpec(Section):
    """The student against its teacher after training (``workers.eval.EvalConfig``); never used in training."""

    prompts: list[Text] = Field(
        default_factory=list, description="eval prompts, held out from training (default: train.sample_prompts)"
    )
    images_per_prompt: int = Field(4, ge=1, description="samples per prompt and sampler for FID and alignment")
    student_steps: int = Field(1, ge=1, le=1000, description="the student's sampling steps")
    teacher_steps: int = Field(50, ge=1, le=1000, description="the teacher's reference sampler steps")
    teacher_solver: Literal["ddim", "dpmpp"] = Field("ddim", description="the teacher's reference sampler")
    guidance_scale: float = Field(5.0, ge=1, description="the teacher's classifier-free guidance scale")
    batch_size: int = Field(32, ge=1, description="images per sampling call")
    seed: Seed = Field(0, description="noise of both samplers (the same for student and teacher)")
    speed_batch_size: int = Field(8, ge=1, description="images per timed call")
    speed_warmup: int = Field(1, ge=0, description="untimed calls before timing")
    speed_repeats: int = Field(3, ge=1, description="timed calls; the median counts")
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


class PromotionSpec(Section):
    """Gates a registered student must pass before ``addctl promote`` makes it the champion (null: gate off)."""

    max_fid_ratio: float | None = Field(1.0, gt=0, description="student FID ≤ this × the teacher's FID")
    alignment_margin: float | None = Field(0.0, ge=0, description="student alignment ≥ the teacher's − this")
    min_speedup: float | None = Field(10.0, gt=0, description="teacher ms/image ÷ student ms/image ≥ this")


class _Bounds(Section):
    @staticmethod
    def _ordered(v: tuple, positive: bool = False) -> tuple:
        lo, hi = v
        if not lo < hi:
            raise ValueError(f"the lower bound must be below the upper one (got [{lo}, {hi}])")
        if positive and lo <= 0:
            raise ValueError(f"loguniform bounds must be > 0 (got [{lo}, {hi}])")
        return v


class ChoiceDomain(Section):
    choice: list[Any] = Field(min_length=1, description="sample one of these values per trial")


class GridDomain(Section):
    grid: list[Any] = Field(min_length=1, description="run every value (times sweep.num_samples)")


class UniformDomain(_Bounds):
    uniform: tuple[float, float] = Field(description="a float drawn uniformly from [lo, hi]")

    @field_validator("uniform")
    @classmethod
    def _check(cls, v):
        return cls._ordered(v)


class LogUniformDomain(_Bounds):
    loguniform: tuple[float, float] = Field(description="a float drawn log-uniformly from [lo, hi], lo > 0")

    @field_validator("loguniform")
    @classmethod
    def _check(cls, v):
        return cls._ordered(v, positive=True)


class RandIntDomain(_Bounds):
    randint: tuple[int, int] = Field(description="an integer drawn uniformly from [lo, hi)")

    @field_validator("randint")
    @classmethod
    def _check(cls, v):
        return cls._ordered(v)


DOMAINS = {
    "choice": ChoiceDomain,
    "grid": GridDomain,
    "uniform": UniformDomain,
    "loguniform": LogUniformDomain,
    "randint": RandIntDomain,
}


def _domain_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return next(iter(type(value).model_fields))
    if isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in DOMAINS:
        return next(iter(value))
    return None


Domain = Annotated[
    Annotated[ChoiceDomain, Tag("choice")]
    | Annotated[GridDomain, Tag("grid")]
    | Annotated[UniformDomain, Tag("uniform")]
    | Annotated[LogUniformDomain, Tag("loguniform")]
    | Annotated[RandIntDomain, Tag("randint")],
    Discriminator(
        _domain_kind,
        custom_error_type="search_domain",
        custom_error_message=(
            "a search domain is one key: {choice: [...]}, {grid: [...]}, {uniform: [lo, hi]}, "
            "{loguniform: [lo, hi]} or {randint: [lo, hi]}"
        ),
    ),
]


class SweepSpec(Section):
    """A Ray Tune search over spec fields (``orchestrator.sweep.SweepConfig``); the best trial is registered."""

    search_space: dict[str, Domain] = Field(
        min_length=1,
        description="dotted spec path -> {choice|grid: [...]} or {uniform|loguniform|randint: [lo, hi]}; "
        "variant -> {grid: [{label: ..., dotted.path: value, ...}, ...]} sets several fields per point",
    )
    metric: str = Field("loss/distill", min_length=1, description="reported metric the trials are ranked by")
    mode: Literal["min", "max"] = Field("min", description="whether the metric is better low (min) or high (max)")
    num_samples: int = Field(4, ge=1, description="number of trials (each grid point runs this many times)")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="trials at once (default: as many as the cluster's CPUs and GPUs hold)"
    )
    scheduler: Literal["asha", "fifo"] | None = Field(
        "asha", description="asha: stop poor trials early; fifo (or null): every trial runs to the end"
    )
    grace_period: int = Field(1, ge=1, description="ASHA: reports before a trial may be stopped")
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep 1/this of the trials at each rung")
    max_t: int | None = Field(None, ge=1, description="ASHA: reports in a full run (default: from train.steps)")
    seed: Seed | None = Field(0, description="seed of the random search (null: random)")
    trial_cpus: float = Field(0.25, ge=0, description="CPUs of each trial's driver (it only waits on its trainer)")
    evaluate_all: bool = Field(
        False, description="evaluate every finished trial (the eval section) and register the best by eval_metric"
    )
    eval_metric: str = Field("student_fid", min_length=1, description="evaluate_all: the evaluation metric that ranks")
    eval_mode: Literal["min", "max"] = Field("min", description="evaluate_all: whether eval_metric is better low")
    max_failed_trials: int = Field(
        0, ge=0, description="trials that may fail (an error, not an early stop) and the job still succeed"
    )
    trial_retries: int = Field(
        1,
        ge=0,
        description="times a failed trial is resumed from its last checkpoint (not for bad data, a non-finite "
        "loss or a bad value: those come back)",
    )


# ---- the job --------------------------------------------------------------------------------------


class JobSpec(Section):
    """One ADD job: what to distil, on what data, with which resources, tracked where."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="job name (lowercase, - _ .)")]
    teacher: TeacherSpec = Field(description="the pretrained diffusion model ψ to distil")
    student: StudentSpec = Field(default_factory=StudentSpec, description="the student θ")
    discriminator: DiscriminatorSpec = Field(default_factory=DiscriminatorSpec, description="D: frozen F + heads")
    loss: LossSpec = Field(default_factory=LossSpec, description="the ADD objective")
    data: DataSpec = Field(description="the image-caption shards")
    train: TrainSpec = Field(default_factory=TrainSpec, description="optimisation, logging and checkpoints")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Ray Train workers")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="checkpoints and exports")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="student against teacher after training")
    promotion: PromotionSpec = Field(default_factory=PromotionSpec, description="gates for `addctl promote`")
    sweep: SweepSpec | None = Field(None, description="optional Ray Tune sweep (default: a single run)")
    env: dict[str, str] = Field(
        default_factory=dict, description="environment of the workers; secrets only as ${env:NAME} references"
    )

    @field_validator("env", mode="before")
    @classmethod
    def _unquoted(cls, v):
        return scalars_as_strings(v)

    @field_validator("env")
    @classmethod
    def _env(cls, v):
        for key in v:
            if not ENV_NAME.match(key):
                raise ValueError(f"env.{key}: not a valid environment variable name (letters, digits, _)")
        return check_secrets(v, "env")

    @model_validator(mode="after")
    def _table_student_steps(self):
        table = self.eval.table
        n = len(self.student.timesteps) if self.student.timesteps else self.student.steps
        if table is not None and any(k > n for k in table.student_steps):
            raise ValueError(f"eval.table.student_steps: {table.student_steps} — the student samples in 1..{n} steps")
        return self

    @model_validator(mode="after")
    def _batch_divides(self):
        per_step = self.resources.num_workers * self.train.grad_accum
        if self.train.batch_size % per_step:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} must be a multiple of resources.num_workers × "
                f"train.grad_accum = {per_step}"
            )
        return self

    @model_validator(mode="after")
    def _no_clear_secrets(self):
        """Every string of the job, the sweep's included: references well-formed and where they resolve,
        no shell-style ``${...}``, nothing shaped like a credential in clear."""
        for path, value in _strings(self.model_dump(mode="python")):
            in_reference_section = any(path.startswith(s + ".") for s in REFERENCE_SECTIONS)
            if ANY_REF.search(value):
                if not in_reference_section:
                    raise ValueError(
                        f"{path}: ${{env:...}} references are resolved only in {', '.join(REFERENCE_SECTIONS)}; "
                        "set the value there, or put it in the workers' environment"
                    )
                if not SECRET_REF.match(value):
                    raise ValueError(
                        f"{path}: a malformed reference; a reference is the whole value, ${{env:NAME}} with NAME "
                        "made of letters, digits and _ (not starting with a digit)"
                    )
            if SHELL_REF.search(value):
                raise ValueError(
                    f"{path}: shell-style ${{...}} is not expanded (and Ray would expand it on some paths only); "
                    "write the value itself, or a ${env:NAME} reference in env"
                )
            if what := find_clear_secret(value):
                raise ValueError(
                    f"{path}: looks like {what} in clear; put the credential in the workers' environment and "
                    "refer to it as ${env:NAME} in env (or the variables the client reads)"
                )
        return self

    @model_validator(mode="after")
    def _sweep_paths(self):
        if self.sweep is not None:
            check_search_space(self)
        return self


def _strings(value, path: str = ""):
    """(dotted path, value) of every string in a nested dump."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


# ---- sweeps: every swept path exists and every value it can take is valid ------------------------


def sweepable_paths(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Dotted paths of the fields a sweep may vary: every leaf field but ``name``, ``sweep`` and mappings."""
    model = model or JobSpec
    paths = []
    for name, field in model.model_fields.items():
        if not prefix and name in ("name", "sweep", "env"):
            continue
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, Section):
            paths += sweepable_paths(inner, f"{prefix}{name}.")
        elif getattr(inner, "__origin__", None) is not dict:
            paths.append(prefix + name)
    return paths


def check_search_space(spec: JobSpec) -> None:
    """Raise a ``ValueError`` (path first) unless each swept path is a field and each value it can take is valid."""
    allowed = sweepable_paths()
    base = spec.model_dump(mode="python", exclude={"sweep"})
    for path, domain in spec.sweep.search_space.items():
        where = format_path(("sweep", "search_space", path))
        if path == VARIANT:
            _check_variants(spec, domain, where, allowed, base)
            continue
        if path not in allowed:
            close = difflib.get_close_matches(path, allowed, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{where}: {path!r} is not a field of the job spec that a sweep can vary{hint}")
        kind = _domain_kind(domain)
        values = getattr(domain, kind)
        if kind in ("choice", "grid"):
            candidates = [(f"{where}.{kind}[{i}]", v) for i, v in enumerate(values)]
        elif kind == "randint":
            candidates = [(f"{where}.randint", values[0]), (f"{where}.randint", values[1] - 1)]
        else:  # a float anywhere in [lo, hi]: both ends and a non-integral point inside
            lo, hi = values
            inside = lo + (hi - lo) * 0.37
            candidates = [(f"{where}.{kind}", lo), (f"{where}.{kind}", hi), (f"{where}.{kind}", inside)]
        for at, value in candidates:
            data = copy.deepcopy(base)
            set_path(data, path, value)
            try:
                JobSpec.model_validate(data)
            except ValidationError as err:
                problems = problems_from_validation(err, JobSpec)
                message = ([p for p in problems if p.path == path] or problems)[0].message
                message = re.sub(r" \(got .*\)$", "", message)
                if kind in ("uniform", "loguniform") and "integer" in message:
                    message += " (a float domain over an integer field: use randint, choice or grid)"
                shown = safe_repr(value) or "this value"
                raise ValueError(f"{at}: {shown} is not a valid {path}: {message}") from None


VARIANT = "variant"  # a search-space key whose values each set several fields: {label: ..., dotted.path: value}


def variant_fields(variant: Mapping) -> dict:
    """The fields a variant sets (its optional ``label`` names it in tables and is not a field)."""
    return {k: v for k, v in variant.items() if k != "label"}


def _check_variants(spec: JobSpec, domain, where: str, allowed: list[str], base: dict) -> None:
    kind = _domain_kind(domain)
    if kind not in ("choice", "grid"):
        raise ValueError(f"{where}: variants are a choice or a grid of mappings, not {kind}")
    for i, variant in enumerate(getattr(domain, kind)):
        at = f"{where}.{kind}[{i}]"
        if not isinstance(variant, Mapping) or not variant_fields(variant):
            raise ValueError(f"{at}: a variant is a mapping of dotted field paths to values (and an optional label)")
        data = copy.deepcopy(base)
        for path, value in variant_fields(variant).items():
            if path not in allowed:
                close = difflib.get_close_matches(path, allowed, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"{at}: {path!r} is not a field of the job spec that a sweep can vary{hint}")
            set_path(data, path, value)
        try:
            JobSpec.model_validate(data)
        except ValidationError as err:
            problem = problems_from_validation(err, JobSpec)[0]
            raise ValueError(f"{at}: {problem.path}: {problem.message}") from None


def set_path(data: dict, path: str, value: Any) -> None:
    """Set a dotted ``path`` in a nested dict (creating sections as needed)."""
    *parents, last = path.split(".")
    node = data
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[last] = value


# ---- reading a job file ---------------------------------------------------------------------------


MAX_JOB_BYTES = 1 << 20  # a job file is a few kilobytes; more is a mistake (or an attack)
MAX_DEPTH = 32  # nesting of mappings and lists (a job file needs 5)
MAX_VALUES = 20_000  # values (keys, scalars, lists, mappings) written in the file (a large sweep has 500)
MAX_EXPANDED = (50_000, 2_000_000)  # values and characters once every alias is expanded


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that rejects duplicate and unhashable keys (PyYAML keeps the last, or crashes),
    nesting deeper than ``MAX_DEPTH`` (PyYAML's composer recurses), more than ``MAX_VALUES`` values
    (counted as they are read: the rest of the file is never scanned) and aliases that expand past
    ``MAX_EXPANDED`` (a few kilobytes of nested aliases stand for gigabytes once expanded)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._values = 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._values += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark
                )
            if self._values > MAX_VALUES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_VALUES:,} values: not a job file", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand past ``MAX_EXPANDED`` (or refer to themselves), without
    expanding it: each node's expanded size is computed once and shared by its aliases."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, characters) once expanded
    pending: set[int] = set()

    def size(node: yaml.Node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in pending:
            raise yaml.composer.ComposerError(None, None, "an alias refers to its own anchor", node.start_mark)
        pending.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        values, chars = 1, len(node.value) if isinstance(node, yaml.ScalarNode) else 0
        for child in children:
            v, c = size(child)
            values, chars = values + v, chars + c
        pending.discard(key)
        if values > MAX_EXPANDED[0] or chars > MAX_EXPANDED[1]:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases expand this document past {MAX_EXPANDED[0]:,} values or {MAX_EXPANDED[1]:,} characters",
                node.start_mark,
            )
        sizes[key] = (values, chars)
        return values, chars

    size(root)


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            kind = "mapping" if isinstance(key_node, yaml.MappingNode) else "list"
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain name, not a {kind}", key_node.start_mark
            )
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(None, None, "a key must be a plain name", key_node.start_mark)
        if key in seen:
            shown = repr(key) if len(repr(key)) <= 40 else repr(key)[:37] + "..."
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {shown} (each key once per section)", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text: str) -> Any:
    """YAML text as Python values, within the bounds above; raises ``yaml.YAMLError`` (with a mark)
    for anything it refuses, and nothing else but ``ValueError`` (a number too long to convert)."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
    except RecursionError:
        raise yaml.YAMLError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None


def parse_yaml(text: str, source: str = "<job>") -> dict:
    """A job file's text as a dict; every parsing problem becomes a ``JobSpecError`` with line and column."""
    if len(text) > MAX_JOB_BYTES:
        raise JobSpecError([Problem("(file)", f"larger than {MAX_JOB_BYTES:,} characters: not a job file")], source)
    try:
        data = load_yaml(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        reason = err.problem or err.context or "invalid YAML"
        raise JobSpecError([Problem("(yaml)", f"{where}{reason}")], source) from None
    except yaml.YAMLError as err:
        raise JobSpecError([Problem("(yaml)", str(err))], source) from None
    except Exception as err:  # noqa: BLE001  (e.g. an integer of 5,000 digits): bad input, never a traceback
        reason = "a number of more than 4,300 digits" if "digits" in str(err) else f"{type(err).__name__}: {err}"
        raise JobSpecError([Problem("(yaml)", f"cannot be read: {reason}")], source) from None
    if data is None:
        raise JobSpecError(
            [Problem("(root)", "the job file is empty; it needs at least name, teacher and data")], source
        )
    if not isinstance(data, dict):
        raise JobSpecError(
            [
                Problem(
                    "(root)",
                    f"a job file is a mapping of sections (name, teacher, data, ...), not a {type(data).__name__}",
                )
            ],
            source,
        )
    return data


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """``data`` with each ``KEY=VALUE`` override set (VALUE parsed as YAML: numbers, lists, null...).

    KEY is a dotted path checked against the spec (``train.steps``, ``env.HF_HOME``,
    ``sweep.search_space.loss.lambda_distill``: for a mapping the rest of the path is the key).
    """
    data = copy.deepcopy(data)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem(f"--set {item}", "expected KEY=VALUE, e.g. --set train.steps=100"))
            continue
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except Exception as err:  # noqa: BLE001  (YAMLError, or a number too long to convert)
            problems.append(Problem(key, f"--set value is not valid YAML: {getattr(err, 'problem', None) or err}"))
            continue
        problem = _set_override(data, key, value)
        if problem:
            problems.append(problem)
    if problems:
        raise JobSpecError(problems, "--set")
    return data


def _set_override(data: dict, key: str, value: Any) -> Problem | None:
    parts = key.split(".")
    model: type[BaseModel] = JobSpec
    node = data
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        field = model.model_fields.get(part)
        if field is None:
            close = difflib.get_close_matches(part, list(model.model_fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return Problem(path, f"unknown key in --set{hint}; allowed here: {', '.join(model.model_fields)}")
        inner = _section_type(field.annotation)
        last = i == len(parts) - 1
        if last:
            node[part] = value
            return None
        if inner is not None:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, model = node[part], inner
            continue
        if getattr(_non_optional(field.annotation), "__origin__", None) is dict:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node[part][".".join(parts[i + 1 :])] = value
            return None
        return Problem(path, f"is a {_type_name(field.annotation)}, not a section: set {path}=VALUE")
    return None


def _non_optional(tp):
    args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
    return args[0] if type(None) in getattr(tp, "__args__", ()) and len(args) == 1 else tp


def _section_type(tp) -> type[BaseModel] | None:
    tp = _non_optional(tp)
    return tp if isinstance(tp, type) and issubclass(tp, Section) else None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def validate_job(data: Mapping, source: str | None = None) -> JobSpec:
    """A dict (a parsed job file) as a ``JobSpec``; any problem raises ``JobSpecError`` naming the fields."""
    try:
        return JobSpec.model_validate(dict(data))
    except ValidationError as err:
        raise JobSpecError(problems_from_validation(err, JobSpec), source) from None
    except RecursionError:
        raise JobSpecError([Problem("(root)", "nested too deeply to validate")], source) from None
    except Exception as err:  # noqa: BLE001  (a validator tripped on input it did not expect): still bad input
        raise JobSpecError([Problem("(root)", f"cannot be validated: {type(err).__name__}: {err}")], source) from None


def read_job_text(path: str | os.PathLike) -> str:
    """A job file's text, at most ``MAX_JOB_BYTES`` of UTF-8; raises ``JobSpecError`` otherwise."""
    source = str(path)
    try:
        with open(path, "rb") as f:  # noqa: PTH123
            raw = f.read(MAX_JOB_BYTES + 1)  # a bounded read: /dev/zero or a 10 GB file are refused alike
    except FileNotFoundError:
        raise JobSpecError([Problem("(file)", "no such job file")], source) from None
    except OSError as err:
        raise JobSpecError([Problem("(file)", f"cannot read the job file: {type(err).__name__}")], source) from None
    if len(raw) > MAX_JOB_BYTES:
        raise JobSpecError([Problem("(file)", f"larger than {MAX_JOB_BYTES:,} bytes: not a job file")], source)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JobSpecError(
            [Problem("(file)", f"not UTF-8 text (byte {err.start}): a job file is YAML text")], source
        ) from None


def load_job(path: str | os.PathLike, overrides: Sequence[str] = (), *, check_paths: bool = True) -> JobSpec:
    """Read, override (``--set KEY=VALUE``) and validate a job file; raises ``JobSpecError``.

    ``check_paths``: the local paths the job reads must exist here (off for a job submitted to a
    cluster elsewhere, whose paths are on its own disks; the cluster checks them when it loads the job).
    """
    source = str(path)
    data = parse_yaml(read_job_text(path), source)
    try:
        data = apply_overrides(data, overrides)
    except JobSpecError:
        raise
    except Exception as err:  # noqa: BLE001  (an override on input it did not expect): bad input all the same
        raise JobSpecError([Problem("--set", f"cannot be applied: {type(err).__name__}: {err}")], source) from None
    spec = validate_job(data, source)
    if check_paths and (problems := missing_paths(spec)):
        raise JobSpecError(problems, source)
    return spec


# Fields the job reads from: a local path there must exist (a hub id or a relative name is left alone).
INPUT_PATHS = (
    "teacher.source",
    "discriminator.dinov2",
    "data.uri",
    "eval.clip_model",
    "eval.table.teacher_rows",
    "eval.table.reference_uri",
)
_CLEARLY_A_PATH = re.compile(r"^(/|\./|\.\./|~|file://)")


def missing_paths(spec: JobSpec) -> list[Problem]:
    """A problem for each input that clearly is a local path (``/…``, ``./…``, ``../…``, ``~…``,
    ``file://…``) but exists nowhere on this machine."""
    problems = []
    for path in INPUT_PATHS:
        value: Any = spec
        for part in path.split("."):
            value = getattr(value, part, None)
        if not isinstance(value, str) or not _CLEARLY_A_PATH.match(value):
            continue
        local = value[len("file://") :] if value.startswith("file://") else value
        try:
            exists = Path(local).expanduser().exists()
        except (OSError, ValueError, RuntimeError) as err:  # a name too long, a NUL byte, an unknown ~user
            problems.append(Problem(path, f"not a usable path ({type(err).__name__})"))
            continue
        if not exists:
            problems.append(Problem(path, "no such file or folder on this machine"))
    return problems


def dump_job(spec: JobSpec) -> str:
    """The job as YAML with every default filled in (references stay references): what a submitted job runs."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---- secrets: resolved on the workers only ----------------------------------------------------------


def references(values: Mapping[str, str]) -> dict[str, str]:
    """``{key: NAME}`` for each value of ``values`` that is a ``${env:NAME}`` reference."""
    return {k: m[1] for k, v in values.items() if (m := SECRET_REF.match(str(v)))}


def resolve_secrets(
    values: Mapping[str, str], where: str = "env", environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """On a worker: ``values`` with each ``${env:NAME}`` replaced by that variable's value.

    Raises ``SecretError`` naming the keys and variables (never a value) when one is not set.
    Call it where the job runs, never on the client; do not log what it returns.
    """
    environ = secrets.environ() if environ is None else environ
    resolved, missing = {}, []
    for key, value in values.items():
        ref = SECRET_REF.match(str(value))
        if ref is None:
            resolved[key] = str(value)
        elif ref[1] in environ:
            resolved[key] = environ[ref[1]]
        else:
            missing.append(f"{where}.{key} -> ${{env:{ref[1]}}}")
    if missing:
        raise SecretError(
            f"not set on this machine: {', '.join(missing)}; set the variable in the workers' environment "
            "(a Kubernetes Secret, the environment of `ray start`, or your shell for `addctl run`)"
        )
    # From here this process holds the values: mask them in every message and log record.
    secrets.remember(resolved[k] for k in references(values))
    secrets.redact_log_records()
    return resolved


def apply_env(spec: JobSpec, environ: Mapping[str, str] | None = None) -> list[str]:
    """On a worker: set the job's ``env`` (references resolved) in this process; returns the names set."""
    resolved = resolve_secrets(spec.env, "env", environ)
    os.environ.update(resolved)
    return sorted(resolved)
