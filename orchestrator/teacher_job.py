"""A teacher-training job: the plain diffusion training of ``train.py`` from image-caption shards,
described by a YAML file, tracked in MLflow and exported as a diffusers folder.

The job file maps onto ``TeacherJobSpec`` (unknown keys are errors naming the field, as for the
ADD jobs of ``orchestrator/spec.py``). ``run_teacher_job(spec)`` reads the shards at ``data.uri``
into memory, trains (or resumes: the same ``output.run`` folder continues from its checkpoint),
logs the loss curve to MLflow as it goes (one point per checkpoint), exports the EMA teacher to
``output.export`` and logs that folder as the run's ``teacher`` artifact. Every invocation is an
MLflow run of its own; a resumed one first logs the history it resumes from, so each run shows the
whole curve.

Example (``jobs/fashion-mnist-teacher.yaml``)::

    addctl prepare-data fashion-mnist runs/data/fashion-mnist-train
    addctl teacher train jobs/fashion-mnist-teacher.yaml               # run again: resumes

The training itself is ``workers.diffusion.train``; this module is the job around it (the
orchestrator's side: the job file, the checks before anything runs, the MLflow run).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator

from orchestrator.errors import JobSpecError, Problem, problems_from_validation
from orchestrator.spec import URI_PASSWORD, apply_overrides, job_yaml, parse_yaml, read_job_text
from workers.config import Section
from workers.data.config import ShardsSpec
from workers.data.storage import StorageError, StorageOptions, display_uri, split_uri, storage_options
from workers.diffusion.config import TeacherNetworkSpec, network_of

__all__ = ["TeacherJobResult", "TeacherJobSpec", "load_teacher_job", "run_teacher_job", "validate_teacher_job"]


class TeacherDataSpec(ShardsSpec):
    uri: str = Field(
        description="image-caption Parquet shards (addctl prepare-data): a local folder, file://, s3://, gs://"
    )

    @field_validator("uri")
    @classmethod
    def _no_password(cls, v):
        if URI_PASSWORD.match(v):
            raise ValueError("the URI holds a password in clear; put credentials in the environment")
        return v


class TeacherTrainSpec(Section):
    """Defaults: the settings the shipped Fashion-MNIST teacher was trained with."""

    steps: int = Field(6000, ge=1, description="total optimizer steps (a resumed run trains up to this many)")
    batch_size: int = Field(128, ge=1, description="images per step")
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate")
    warmup: int = Field(200, ge=1, description="linear learning-rate warmup, in steps")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay (exported unless output.weights: model)")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="probability of the empty caption (for guidance)")
    checkpoint_every: int = Field(100, ge=1, description="checkpoint (and log the mean loss) every this many steps")
    seed: int = Field(0, description="seed of the initial weights and of every step's draws")
    bf16: bool = Field(True, description="bf16 autocast on the CPU")
    threads: int = Field(1, ge=1, description="torch threads")


class TeacherOutputSpec(Section):
    run: str = Field(description="run folder (checkpoint.pt, history.json, config.json); the same folder resumes")
    export: str = Field(description="where the teacher goes, as a diffusers folder (replaced atomically)")
    weights: Literal["ema", "model"] = Field(
        "ema", description="export the EMA of the weights, or the trained weights themselves (short runs)"
    )


class TeacherTrackingSpec(Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the embedded local store)"
    )
    experiment: str = Field("teacher", min_length=1, description="MLflow experiment")
    run_name: str | None = Field(None, min_length=1, description="name of the MLflow run (default: the job's name)")


class TeacherJobSpec(Section):
    """One teacher-training job: a caption-conditioned pixel teacher (UNet or MMDiT) trained by plain diffusion."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="job name (lowercase, - _ .)")]
    data: TeacherDataSpec = Field(description="the image-caption shards")
    network: TeacherNetworkSpec = Field(default_factory=TeacherNetworkSpec, description="the teacher network")
    train: TeacherTrainSpec = Field(default_factory=TeacherTrainSpec, description="optimisation and checkpoints")
    output: TeacherOutputSpec = Field(description="run folder and export folder")
    tracking: TeacherTrackingSpec = Field(default_factory=TeacherTrackingSpec, description="MLflow")


# ---- reading a job file ---------------------------------------------------------------------------


def validate_teacher_job(data: dict, source: str | None = None) -> TeacherJobSpec:
    """A parsed teacher job file as a ``TeacherJobSpec``; raises ``JobSpecError`` naming every bad field."""
    try:
        return TeacherJobSpec.model_validate(data)
    except ValidationError as err:
        raise JobSpecError(problems_from_validation(err, TeacherJobSpec), source) from None


def load_teacher_job(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TeacherJobSpec:
    """Read, override (``--set KEY=VALUE``) and validate a teacher job file; raises ``JobSpecError``."""
    source = str(path)
    text = read_job_text(path)  # bounded, UTF-8: the same refusals as an ADD job file
    return validate_teacher_job(apply_overrides(parse_yaml(text, source), overrides, TeacherJobSpec), source)


# ---- running it -----------------------------------------------------------------------------------


@dataclass
class TeacherJobResult:
    run_id: str  # the MLflow run of this invocation
    tracking_uri: str
    step: int  # steps trained in all, this invocation and those it resumed
    loss: float | None  # mean loss over the last checkpoint interval
    export: str  # the exported teacher folder


def check_shards(spec: TeacherJobSpec, options: StorageOptions) -> list[str]:
    """The shard names at ``data.uri``; a missing local folder is a ``FileNotFoundError`` saying how to make it."""
    from workers.data.ingest import list_shards

    uri = spec.data.uri
    try:
        return list_shards(uri, "parquet", options)
    except StorageError as err:
        if split_uri(uri)[0] != "file":
            raise
        raise FileNotFoundError(
            f"data.uri: {err}; write the shards first, e.g. addctl prepare-data fashion-mnist {display_uri(uri)}"
        ) from None


def check_resumable(spec: TeacherJobSpec) -> list[dict]:
    """The history ``output.run`` resumes from ([] for a fresh run); refuses a run trained on other
    data or started with another network."""
    out = Path(spec.output.run)
    if not (out / "checkpoint.pt").exists():
        return []
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    trained_on = config.get("data")  # absent: a run of ``addctl teacher train-idx`` on the idx files
    if trained_on is None or split_uri(trained_on) != split_uri(spec.data.uri):
        problem = Problem(
            "output.run",
            f"{out} holds a run trained on {trained_on or 'the Fashion-MNIST idx files'}, not on "
            f"{display_uri(spec.data.uri)}: resuming it would mix them; give another run folder",
        )
        raise JobSpecError([problem])
    started_with, asked = network_of(config).model_dump(), spec.network.model_dump()
    if started_with != asked:
        differ = ", ".join(f"{k} {started_with[k]!r} (job: {v!r})" for k, v in asked.items() if started_with[k] != v)
        why = f"{out} holds a run of another network, {differ}: its weights would not fit; give another run folder"
        problem = Problem("network", why)
        raise JobSpecError([problem])
    history = out / "history.json"
    return json.loads(history.read_text()) if history.exists() else []


def run_teacher_job(spec: TeacherJobSpec, tracking_uri: str | None = None) -> TeacherJobResult:
    """Train (or resume) the teacher, export it, and track the run in MLflow: params, the loss at each
    checkpoint, the resolved job, the exported folder. ``tracking_uri`` overrides ``tracking.uri``."""
    import torch
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from orchestrator.embedded import tracking_uri as resolve_tracking_uri
    from orchestrator.tracking import (
        JobStopped,
        Redactor,
        code_version,
        experiment_id,
        flatten,
        numeric_metrics,
        stop_on_signals,
    )
    from workers.diffusion.networks import teacher_network
    from workers.diffusion.train import ShardCaptions, export, minilm_encoder, train

    # 1. Everything that can be wrong with the input fails before a run is tracked.
    options = storage_options(spec.data.storage_options, "data.storage_options")
    check_shards(spec, options)
    resumed = check_resumable(spec)
    torch.set_num_threads(spec.train.threads)
    out, folder = Path(spec.output.run), Path(spec.output.export)

    # 2. The MLflow run: the resolved job as params and job.yaml, the curve resumed from.
    uri = resolve_tracking_uri(tracking_uri, spec.tracking.uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    dump = spec.model_dump(mode="json")
    redact = Redactor.for_spec(dump)
    experiment = experiment_id(client, uri, spec.tracking.experiment)
    run_id = client.create_run(experiment, run_name=spec.tracking.run_name or spec.name).info.run_id
    tags = {"job.name": spec.name, "job.kind": "teacher", "output.run": str(out.resolve()), **code_version()}
    if resumed:
        tags["resumed_from_step"] = resumed[-1]["step"]

    def log_history(entries: list[dict]) -> None:
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now, int(entry["step"]))
            for entry in entries
            for key, value in numeric_metrics({k: v for k, v in entry.items() if k != "step"}).items()
        ]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])

    stopped = threading.Event()

    def on_stop(signum: int) -> None:  # SIGTERM/SIGINT: end the run now, the process may not reach the finally
        stopped.set()
        client.set_terminated(run_id, status="KILLED")

    status = "FAILED"
    try:
        with stop_on_signals(on_stop):
            params = [Param(k, redact(v)) for k, v in flatten(dump).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run_id, params=params[i : i + 100])
            client.log_batch(run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])
            client.log_text(run_id, redact(job_yaml(dump)), "job.yaml")
            log_history(resumed)

            # 3. Train from the shards, logging each checkpoint's loss as it is saved.
            encoder = minilm_encoder(teacher_network(spec.network).text_tokens)
            data = ShardCaptions(encoder, spec.data.uri, options)
            client.log_batch(run_id, params=[Param(f"data.{k}", str(v)) for k, v in data.config.items() if k != "data"])
            t = spec.train
            final = train(
                out,
                t.steps,
                batch_size=t.batch_size,
                lr=t.lr,
                warmup=t.warmup,
                ema_decay=t.ema_decay,
                caption_dropout=t.caption_dropout,
                checkpoint_every=t.checkpoint_every,
                seed=t.seed,
                bf16=t.bf16,
                data=data,
                on_checkpoint=lambda entry: log_history([entry]),
                network=spec.network,
            )

            # 4. Export (atomically), then log the teacher folder.
            export(out, folder, weights=spec.output.weights)
            client.log_artifacts(run_id, str(folder), "teacher")
            client.log_artifact(run_id, str(folder / "training.json"))
        status = "FINISHED"
    except (KeyboardInterrupt, JobStopped):
        status = "KILLED"
        raise
    finally:
        if not stopped.is_set():
            client.set_terminated(run_id, status=status)
    return TeacherJobResult(run_id, uri, int(final["step"]), final.get("loss"), str(folder))
