"""The Ray Train side of an ADD job: ``build_trainer(spec)`` -> TorchTrainer, ``run_training(trainer)``.

Example (a Ray cluster is running, or ``ray.init(num_cpus=...)`` was called)::

    spec = TrainJob.model_validate(yaml.safe_load(open("jobs/fmnist.yaml")))  # or a JobSpec
    result = run_training(build_trainer(spec))        # resumes if spec.name already has checkpoints
    result.return_value["export_uri"]                 # the exported diffusers folder of the student

Storage: the run's checkpoints go to ``<storage.uri>/<run name>/checkpoint_<step>_<attempt>`` and
the final student to ``<storage.uri>/<run name>/student``. Building the trainer again with the
same name and storage resumes from the latest registered checkpoint (Ray Train V2 has no
``restore``), also with another number of workers. Object storage is checked before anything
starts: an unreachable endpoint or a wrong bucket is a ``StorageError`` naming the URI and never
a credential.

Failures: ``FailureConfig(max_failures=resources.max_failures)``: a worker that dies (or raises)
is replaced and the run continues from the last checkpoint. On object storage every write of the
run (checkpoints, Ray Train's registry of them, the export) retries through a restarting server for
``storage.options.retry_s`` seconds (``workers.data.transfer``). Storage down for longer fails the
attempt (the run, when it is Ray Train's controller that cannot write: it retries no controller
error), and once the attempts are spent ``run_training`` raises the ``StorageError`` naming the
storage URI.

A non-finite loss is not retried (see ``loop.py``): the run ends, ``run_training`` raises
``NonFiniteLossError`` with the step and the values, and ``error.checkpoint`` is the last good
checkpoint.

Data failures are not retried either (a retry cannot mend the data; one used to finish on the
other shards and succeed): the data layer records the failure in the run's own ``RecordLedger``
(``workers.data.ingest``) before raising, every attempt Ray Train restarts checks that ledger
before it trains and ends at once, and ``run_training`` raises ``DataError`` naming the shard. A
run that finishes carries the ledger's report (rows read, bad, lost per shard) in
``result.return_value["data"]``.

For Ray Tune (``Tuner(train_driver_fn, ...)``), the driver function calls ``build_trainer`` with a
trial-specific ``run_name`` and ``run_training``; metrics reach Tune through its
``TuneReportCallback`` (every report of the loop is one ``training_iteration``).
"""

from __future__ import annotations

import functools
import math
import os
import uuid
from collections.abc import Sequence

import pyarrow.fs as pafs
import ray
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, Result, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer
from torch import nn

from workers.data.shards import read_manifest
from workers.data.storage import (
    StorageError,
    StorageOptions,
    check_reachable,
    display_uri,
    join_uri,
    resolve,
    split_uri,
    storage_options,
)
from workers.data.transfer import retrying_filesystem
from workers.train.config import TrainJob
from workers.train.loop import FaultInjection, LoopOptions, ModuleRecipe, TrainCallback, train_loop_per_worker
from workers.train.models import caption_encoder

__all__ = [
    "DataError",
    "NonFiniteLossError",
    "build_train_dataset",
    "build_trainer",
    "raise_for_status",
    "run_training",
]


class NonFiniteLossError(FloatingPointError):
    """The run stopped at a non-finite loss; ``checkpoint`` is the last good one (or None)."""

    def __init__(self, message: str, step: int, checkpoint=None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class DataError(RuntimeError):
    """The training data failed (an unreadable shard, too many bad records); the message names the shard."""


def run_storage(uri: str, options: StorageOptions) -> tuple[pafs.FileSystem, str]:
    """Filesystem and scheme-less path of the runs' storage, checked (and created when local)."""
    check_reachable(uri, options, must_exist=False)
    fs, path = resolve(uri, options)
    if split_uri(uri)[0] == "file":
        os.makedirs(path, exist_ok=True)
    return fs, path


def micro_batch_size(spec: TrainJob) -> int:
    return spec.train.batch_size // (spec.resources.num_workers * spec.train.grad_accum)


def build_train_dataset(spec: TrainJob, ledger: str | None = None) -> ray.data.Dataset:
    """The job's Ray Data stream, enough epochs for ``train.steps`` chained in a (seed, epoch) order.

    Blocks hold one micro-batch each, so Ray Train's deterministic split (``preserve_order``)
    hands out whole micro-batches and each rank's share is a pure function of the data order.
    ``ledger``: the name of the run's ``RecordLedger`` (default: the job-wide one).
    """
    from workers.data.ingest import DEFAULT_LEDGER, build_dataset, embed_captions

    d, t = spec.data, spec.train
    options = storage_options(d.storage_options, "data.storage_options")
    manifest = read_manifest(d.uri, options) if d.format == "parquet" else None
    rows = (manifest or {}).get("rows") or 0
    # One spare epoch for bad records and the rows streaming_split(equal=True) drops. Without a
    # manifest (WebDataset) the size is unknown: one epoch, which the loop reads pass after pass.
    epochs = math.ceil(t.steps * t.batch_size / rows) + 1 if rows else 1
    micro = micro_batch_size(spec)
    ds = build_dataset(
        d.uri,
        format=d.format,
        resolution=d.resolution,
        channels=d.channels,
        seed=d.shuffle_seed,
        num_epochs=epochs,
        shuffle_buffer=d.local_shuffle_buffer,
        max_bad_fraction=d.max_bad_fraction,
        batch_size=micro,
        storage=options,
        preserve_order=True,
        ledger=ledger or DEFAULT_LEDGER,
    )
    if d.embed_captions:  # the loop reads the text_embedding_* columns instead of encoding captions
        encoder = functools.partial(caption_encoder, spec.teacher.source, guidance=spec.teacher.guidance)
        ds = embed_captions(ds, encoder, batch_size=micro, concurrency=1)
    return ds


def _check_cpus(spec: TrainJob) -> None:
    """Refuse a layout that leaves Ray Data no CPU: it would hang rather than fail."""
    if not ray.is_initialized():
        return
    r = spec.resources
    total = ray.cluster_resources().get("CPU", 0)
    embedder = 1 if spec.data.embed_captions and not ray.cluster_resources().get("GPU") else 0  # its actor
    need = r.num_workers * r.cpus_per_worker + r.data_cpus + embedder
    if total < need:
        raise ValueError(
            f"Ray has {total:g} CPUs; the training workers reserve {r.num_workers} × {r.cpus_per_worker:g} and "
            f"Ray Data needs resources.data_cpus = {r.data_cpus:g}"
            f"{' + 1 for the caption-embedding actor' if embedder else ''}: start Ray with more (logical) CPUs or "
            "lower resources.num_workers / cpus_per_worker"
        )


def build_trainer(
    spec: TrainJob,
    *,
    storage_path: str | None = None,
    run_name: str | None = None,
    datasets: dict | None = None,
    callbacks: Sequence[TrainCallback] = (),
    run_callbacks: Sequence[UserCallback] = (),
    export: bool = True,
    stop_at_step: int | None = None,
    fault: FaultInjection | None = None,
    dinov2: nn.Module | None = None,
    placement_strategy: str = "PACK",
) -> TorchTrainer:
    """A TorchTrainer for ``spec``; ``storage_path`` (a local folder or s3://bucket/prefix) and
    ``run_name`` default to ``storage.uri`` and ``name``. ``datasets`` replaces the job's Ray Data
    stream (``{"train": ds}`` with the ``workers.data.ingest`` columns). ``callbacks`` run on rank 0
    of the workers; ``run_callbacks`` (Ray Train ``UserCallback``s, e.g. Tune's
    ``TuneReportCallback``) on the controller. ``stop_at_step`` checkpoints and stops early (resume
    with a new trainer of the same name); ``fault`` and ``dinov2`` are for tests. ``placement_strategy``:
    how Ray places the workers (PACK: on as few nodes as fit; SPREAD: over the nodes)."""
    spec = spec.localized()  # the workers' working directory is not the driver's
    uri = storage_path or spec.storage.uri
    name = run_name or spec.name
    options = storage_options(spec.storage.options, "storage.options")
    fs, path = run_storage(uri, options)
    _check_cpus(spec)
    local = isinstance(fs, pafs.LocalFileSystem)
    if not local:  # Ray Train's controller and the workers write checkpoints through it
        fs = retrying_filesystem(fs, display_uri(uri), options)
    r = spec.resources
    loop_options = LoopOptions(
        callbacks=list(callbacks),
        export_path=join_uri(path, name, "student") if export else None,
        export_filesystem=fs if export else None,
        export_uri=display_uri(join_uri(uri, name, "student")) if export else None,
        stop_at_step=stop_at_step,
        fault=fault,
        threads=max(1, int(r.cpus_per_worker)),
        dinov2=ModuleRecipe.of(dinov2) if dinov2 is not None else None,
    )
    resources = {"CPU": r.cpus_per_worker} | ({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})
    # this run's own ledger of bad records and data failures (a sweep's trials share a Ray job)
    ledger = f"add-ledger-{name}-{uuid.uuid4().hex[:8]}" if datasets is None else None
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.training_dump(), "options": loop_options, "ledger": ledger},
        scaling_config=ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=r.gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=None if local else fs,
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            callbacks=list(run_callbacks),
        ),
        datasets=datasets if datasets is not None else {"train": build_train_dataset(spec, ledger)},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ExecutionOptions(preserve_order=True)),
        torch_config=TorchConfig(backend="nccl" if r.gpus_per_worker else "gloo"),
    )


def train_loop(config: dict) -> dict:
    """Each attempt's entry point on the workers: the loop, unless the run's data already failed
    (then every rank ends at once, before any collective: a retry cannot mend the data)."""
    from workers.data.ingest import data_failure

    if config.get("ledger") and (failure := data_failure(config["ledger"])):
        return {"status": "data_error", "step": None, "message": failure, "export_uri": None}
    return train_loop_per_worker(config)


def raise_for_status(result: Result) -> Result:
    """Raise ``NonFiniteLossError`` when the run ended at a non-finite loss, ``DataError`` when its data
    failed; else return ``result``."""
    summary = result.return_value or {}
    if summary.get("status") == "non_finite":
        raise NonFiniteLossError(summary["message"], step=summary["step"], checkpoint=result.checkpoint)
    if summary.get("status") == "data_error":
        raise DataError(summary["message"])
    return result


def _storage_failure(err: Exception) -> StorageError | None:
    """The ``StorageError`` a training worker or Ray Train's controller failed with (storage down for
    longer than its retries), if any."""
    failures = [*(getattr(err, "worker_failures", None) or {}).values(), getattr(err, "controller_failure", None)]
    for failure in failures:
        failure = getattr(failure, "_base_exc", failure)  # Ray Train's wrapper keeps the worker's exception
        if isinstance(failure, StorageError):
            return failure
    return None


def run_training(trainer: TorchTrainer) -> Result:
    """``trainer.fit()``, then ``raise_for_status``. ``return_value`` is the loop's summary: status
    ("completed" or "stopped"), step, restored_from_step, export_uri, and ``data``: the ledger's report
    of rows read, bad and lost per shard (``workers.data.ingest.RecordLedger.report``)."""
    from workers.data.ingest import close_ledger, data_report

    ledger = (getattr(trainer, "train_loop_config", None) or {}).get("ledger")
    try:
        try:
            result = trainer.fit()
        except Exception as err:
            if ledger and (failure := data_report(ledger)["fatal"]):
                raise DataError(failure) from None  # the data layer's message, not Ray's wrapper
            if storage := _storage_failure(err):
                raise StorageError(str(storage)) from None  # naming the storage, not cut short by Ray
            raise
        report = data_report(ledger) if ledger else None
    finally:
        if ledger:
            close_ledger(ledger)
    if report is not None:
        if report["fatal"]:
            raise DataError(report["fatal"])
        if isinstance(result.return_value, dict):
            result.return_value["data"] = report
    return raise_for_status(result)
