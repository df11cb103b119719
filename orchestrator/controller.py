"""The controller: one job, from spec to registered candidate, tracked in MLflow.

``run_job(spec)`` is what ``addctl run`` calls, in-process or as the entrypoint of a submitted Ray
job (``python -m orchestrator.cli run job.yaml``)::

    parent run (the job)                         job.yaml, code version, result.* tags
      child run per training run / sweep trial   params (resolved config, flattened), metrics per
                                                 step, sample grids, job.yaml, code version
    best child: evaluation (eval/* metrics, eval/comparison.png), the student as a pyfunc model,
    registered as a new version of the job's model with the alias ``candidate`` and its
    evaluation and gates as version tags (what ``addctl promote`` judges).

Stopping: SIGTERM or SIGINT (``ray job stop`` sends SIGTERM, then SIGKILL after 3 s) ends the
parent and every child run still running as KILLED at once, from a watcher thread (see
``stop_on_signals``), then the process exits with 128 + the signal (143 for SIGTERM). Any other
failure ends them FAILED, with the error (secrets redacted) as the tag ``job.error``.
``orchestrator.tracking.mark_stopped`` does the same from outside, for runs whose driver was SIGKILLed first.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.promotion import eval_tags
from orchestrator.registry import register_candidate
from orchestrator.spec import VARIANT, JobSpec, PromotionSpec, variant_fields
from orchestrator.tracking import JobStopped, JobTracker, TrackingCallback, stop_on_signals
from workers.data.synthetic import provenance_params
from workers.eval.config import EvalSpec

log = logging.getLogger(__name__)
SUBMISSION_ENV = "ADD_SUBMISSION_ID"  # set by ``addctl submit`` in the job's runtime env; tagged on the parent


@dataclass
class JobResult:
    """What a job produced."""

    parent_run_id: str
    child_run_ids: list[str] = field(default_factory=list)
    best_run_id: str | None = None
    export_uri: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    evaluation: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what training said a person must see (heads at chance)
    balance: str | None = None  # the last report's balance of the two losses and the heads' state
    data: dict = field(default_factory=dict)  # rows read, bad, and lost per shard (a single run)
    trials: int = 0  # a sweep's trials, and those that failed: {trial, run_id, error}
    failed_trials: list[dict] = field(default_factory=list)


class SweepTrialsFailed(RuntimeError):
    """More sweep trials failed than ``sweep.max_failed_trials`` allows; the message names each."""


# ---- the job's sections ---------------------------------------------------------------------------


def eval_section(spec: JobSpec) -> EvalSpec | None:
    """The job's ``eval`` section with the defaults it takes from other sections: ``prompts`` from
    ``train.sample_prompts``, ``table.reference_uri`` from ``data.uri``; None without any prompt."""
    prompts = list(spec.eval.prompts) or list(spec.train.sample_prompts)
    if not prompts:
        return None
    update: dict = {"prompts": prompts}
    if spec.eval.table is not None and spec.eval.table.reference_uri is None:
        update["table"] = spec.eval.table.model_copy(update={"reference_uri": spec.data.uri})
    return spec.eval.model_copy(update=update)


def load_object(ref: str) -> Callable:
    """``"package.module:name"`` to the object it names (feature extractors, scorers, factories)."""
    module, _, name = ref.partition(":")
    if not name:
        raise ValueError(f"{ref!r} is not of the form 'package.module:name'")
    return getattr(importlib.import_module(module), name)


def eval_instruments(spec: JobSpec):
    """(feature extractor, prompt scorer) the job's ``eval`` section names, each None when "none":
    ``features`` ("inception", "none" or "module:factory"), ``scorer`` ("clip", "none" or
    "module:factory"), ``clip_model``."""
    from workers.eval.alignment import CLIPScorer
    from workers.eval.features import InceptionFeatures

    features, scorer = spec.eval.features, spec.eval.scorer
    if features == "none":
        extractor = None
    else:
        extractor = InceptionFeatures() if features == "inception" else load_object(features)()
    if scorer == "none":
        prompt_scorer = None
    elif scorer == "clip":
        prompt_scorer = CLIPScorer(spec.eval.clip_model or "openai/clip-vit-base-patch32")
    else:
        prompt_scorer = load_object(scorer)()
    return extractor, prompt_scorer


def default_evaluator(spec: JobSpec):
    """The evaluator the job's ``eval`` section names (``eval_instruments``), the table's if it has one."""
    from workers.eval.evaluator import Evaluator

    extractor, prompt_scorer = eval_instruments(spec)
    if spec.eval.table is not None:
        return table_evaluator(spec, extractor, prompt_scorer)
    return Evaluator(extractor, prompt_scorer)


def table_evaluator(spec: JobSpec, features, scorer, reference=None):
    """The benchmark-table evaluator of the job's ``eval.table`` section; ``reference`` (real images)
    default: ``eval.table.reference_images`` read from ``eval.table.reference_uri`` (or ``data.uri``)."""
    from workers.eval.reference import reference_images
    from workers.eval.table import TableEvaluator

    config = eval_section(spec)
    if features is None:
        raise ValueError("eval.table needs a feature network (eval.features) for FID and recall")
    if config is None:
        raise ValueError("the benchmark needs at least one prompt (eval.prompts or train.sample_prompts)")
    if reference is None:
        t = config.table
        storage = _data_storage(spec) if spec.eval.table.reference_uri is None else None
        d = spec.data
        reference = reference_images(t.reference_uri, t.reference_images, d.resolution, d.channels, storage)
    return TableEvaluator(config, features, scorer, reference)


# ---- one job --------------------------------------------------------------------------------------


def run_job(
    spec: JobSpec,
    *,
    tracking_uri: str | None = None,
    storage_path: str | None = None,
    sweep=None,
    evaluation=None,
    evaluator=None,
    promotion_gates: PromotionSpec | None = None,
    reference=None,
    register: bool = True,
    run_name: str | None = None,
    trainer_kwargs: dict | None = None,
    build_trainer: Callable | None = None,
    on_phase: Callable[[str, str], None] | None = None,
) -> JobResult:
    """Train (one run, or a sweep), evaluate the best student, log it as a model and register it as ``candidate``.

    Explicit arguments override the spec's sections: ``sweep`` (``SweepSpec``), ``evaluation``
    (``EvalSpec``), ``evaluator`` (``Evaluator``; default from the spec's ``eval`` section),
    ``promotion_gates`` (stored on the version for ``promote``), ``reference`` (real images for the
    Fréchet distance, (N, C, H, W) in [0, 1]; default: read from ``data.uri``). ``trainer_kwargs``
    pass through to ``build_trainer`` (tests: ``dinov2``, ``datasets``). ``on_phase(phase, parent_run_id)``
    is called with ``training`` once the parent run exists and ``evaluating`` when training ended
    (``addctl run``'s progress bars).
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    spec = spec.localized()  # relative to here, not to a Tune trial's working directory
    warnings: list[str] = []
    manifest = data_provenance(spec, warn=warnings.append)  # bad data for the mode: refused before any run exists
    if manifest is not None and (spec.eval.table is None or spec.eval.table.reference_uri is None):
        warnings.append(
            "data.mode is synthetic: the evaluation's reference images come from data.uri, the teacher's samples, "
            "so its FID measures the distance to the teacher, not to real images (eval.table.reference_uri)"
        )
    tracker = JobTracker(spec, tracking_uri)

    def stop(signum: int) -> None:  # from the watcher thread, at once
        if tracker.parent_run_id:
            tracker.set_tags(tracker.parent_run_id, {"job.stopped_by": signal.Signals(signum).name})
            tracker.end_all("KILLED")

    with stop_on_signals(stop):
        tracker.start_parent(run_name, tags=_ray_tags())
        result = JobResult(parent_run_id=tracker.parent_run_id)
        data_params = {}
        if manifest is not None:
            data_params = provenance_params(manifest)
            tracker.set_tags(tracker.parent_run_id, data_params)
            tracker.log_text(tracker.parent_run_id, json.dumps(manifest, indent=1), "data/manifest.json")
        status = "FAILED"
        phase = on_phase or (lambda name, run_id: None)
        phase("training", tracker.parent_run_id)
        try:
            started = time.monotonic()
            sweep = sweep if sweep is not None else spec.sweep
            evaluated: dict[str, dict] = {}
            if sweep is not None:
                best, trials = _train_sweep(spec, sweep, tracker, storage_path, trainer_kwargs, build_trainer, result)
                tracker.set_tags(tracker.parent_run_id, {"timing.train_s": f"{time.monotonic() - started:.1f}"})
                phase("evaluating", tracker.parent_run_id)
                if sweep.evaluate_all:
                    evaluator = evaluator or default_evaluator(spec)  # built once: its reference is read once
                    best, evaluated = _evaluate_trials(spec, sweep, tracker, trials, evaluation, evaluator, reference)
            else:
                best = _train_once(
                    spec, tracker, storage_path, trainer_kwargs, build_trainer, result.data, params=data_params
                )
                tracker.set_tags(tracker.parent_run_id, {"timing.train_s": f"{time.monotonic() - started:.1f}"})
                phase("evaluating", tracker.parent_run_id)
            result.best_run_id, result.export_uri = best
            tags = tracker.client.get_run(result.best_run_id).data.tags
            result.warnings = warnings + (tags["train.warning"].split(" | ") if tags.get("train.warning") else [])
            result.balance = tags.get("train.balance")
            if register:
                started = time.monotonic()
                gates = promotion_gates or spec.promotion
                _evaluate_and_register(spec, tracker, result, evaluation, evaluator, gates, reference, evaluated)
                tracker.set_tags(tracker.parent_run_id, {"timing.register_s": f"{time.monotonic() - started:.1f}"})
            status = "FINISHED"
        except (JobStopped, KeyboardInterrupt) as stopped:
            status = "KILLED"
            by = signal.Signals(stopped.signum).name if isinstance(stopped, JobStopped) else "KeyboardInterrupt"
            tracker.set_tags(tracker.parent_run_id, {"job.stopped_by": by})
            raise
        except BaseException as err:
            tracker.set_tags(tracker.parent_run_id, {"job.error": f"{type(err).__name__}: {err}"[:5000]})
            raise
        finally:
            try:
                result.child_run_ids = [r.info.run_id for r in tracker.child_runs()]
            finally:
                tracker.end_all(status)
    return result


def data_provenance(spec: JobSpec, warn: Callable[[str], None] | None = None) -> dict | None:
    """For a job in synthetic mode, the manifest of its set, checked: made by a teacher, the job's unless
    ``data.allow_other_teacher`` (then ``warn`` is told); ``SyntheticDataError`` otherwise. None for real data."""
    if spec.data.mode != "synthetic":
        return None
    from workers.data.synthetic import check_provenance

    return check_provenance(
        spec.data.uri,
        spec.teacher.source,
        options=_data_storage(spec),
        allow_other_teacher=spec.data.allow_other_teacher,
        warn=warn,
    )


def _ray_tags() -> dict[str, str]:
    import ray

    tags = {"ray.job_id": ray.get_runtime_context().get_job_id()}
    if submission := os.environ.get(SUBMISSION_ENV):
        tags["job.submission_id"] = submission
    return tags


def _train_once(
    spec, tracker, storage_path, trainer_kwargs, build_trainer, data=None, params=None
) -> tuple[str, str | None]:
    """One training run as a child run (``params``: logged beside the spec's); ``data`` (a dict) receives
    its data report (``log_data_report``)."""
    from workers.train.trainer import DataError, run_training
    from workers.train.trainer import build_trainer as default_build_trainer

    run_id = tracker.start_child(spec, f"{spec.name}-train", params=params)
    trainer = (build_trainer or default_build_trainer)(
        spec,
        storage_path=storage_path,
        run_name=spec.name,
        callbacks=[TrackingCallback(tracker.tracking_uri, run_id, tracker.redact.names)],
        **(trainer_kwargs or {}),
    )
    try:
        outcome = run_training(trainer)
    except DataError as err:
        tracker.set_tags(run_id, {"data.error": str(err)[:5000]})
        raise
    summary = outcome.return_value or {}
    if isinstance(data, dict):
        data.update(tracker.log_data_report(run_id, summary.get("data"), summary.get("step")))
    export_uri = summary.get("export_uri") or tracker.client.get_run(run_id).data.tags.get("export.uri")
    if summary.get("status") not in (None, "completed"):
        raise RuntimeError(f"training ended with status {summary.get('status')!r}: {summary.get('message', '')}")
    return run_id, export_uri


def _train_sweep(spec, config, tracker, storage_path, trainer_kwargs, build_trainer, result=None):
    """Run the sweep; every trial accounted for on the parent run (``sweep.failed``, ``sweep.failed_trials``)
    and in ``result``; more failed trials than ``max_failed_trials`` fail the job. Returns the best
    ``(run_id, export_uri)`` and the trials."""
    from orchestrator.sweep import run_sweep

    best, trials = run_sweep(
        spec, config, tracker, storage_path=storage_path, trainer_kwargs=trainer_kwargs, build_trainer=build_trainer
    )
    failed = [{"trial": t.trial_id, "run_id": t.run_id, "error": t.error} for t in trials if t.error]
    if result is not None:
        result.trials, result.failed_trials = len(trials), failed
    tracker.set_tags(
        tracker.parent_run_id,
        {
            "sweep.trials": len(trials),
            "sweep.finished": sum(1 for t in trials if t.export_uri),
            "sweep.failed": len(failed),
            "sweep.failed_trials": json.dumps(failed) if failed else "none",
            "sweep.metric": config.metric,
        },
    )
    for trial in failed:
        log.warning("sweep trial %s failed: %s", trial["trial"], trial["error"])
    if len(failed) > config.max_failed_trials:
        reasons = "; ".join(f"trial {t['trial']}: {t['error']}" for t in failed)
        raise SweepTrialsFailed(
            f"{len(failed)} of {len(trials)} sweep trials failed (sweep.max_failed_trials = "
            f"{config.max_failed_trials}): {reasons}"
        )
    if best is None:
        errors = "; ".join(t.error for t in trials if t.error) or "no trial ran to the end"
        raise RuntimeError(f"no sweep trial finished with an exported student: {errors}")
    if not config.evaluate_all:
        tracker.set_tags(tracker.parent_run_id, {"sweep.best_trial": best.trial_id, "sweep.best_run_id": best.run_id})
        tracker.set_tags(best.run_id, {"sweep.best": "true"})
    return (best.run_id, best.export_uri), trials


def _evaluate_trials(spec, config, tracker, trials, evaluation, evaluator, reference):
    """Evaluate every finished trial (each on its own run, files under ``results_dir/<run name>``); the
    best by ``eval_metric`` wins. Writes ``ablation.md``: one row per trial, its swept values and
    evaluation. Returns the best ``(run_id, export_uri)`` and ``{run_id: evaluation}``."""
    config_eval = evaluation if evaluation is not None else eval_section(spec)
    results_dir = spec.eval.table.results_dir if spec.eval.table is not None else None
    finished = [t for t in trials if t.export_uri and t.run_id]
    evaluated, labels = {}, {}
    for trial in finished:
        run = tracker.client.get_run(trial.run_id)
        labels[trial.run_id] = trial_label(run.data.params)
        folder = Path(tempfile.mkdtemp(prefix="add-trial-"))
        try:
            student_dir = local_copy(trial.export_uri, spec, folder)
            out = str(Path(results_dir) / run.info.run_name) if results_dir else None
            evaluated[trial.run_id] = _evaluate(
                spec, tracker, trial.run_id, student_dir, config_eval, evaluator, reference, results_dir=out
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    ranked = [t for t in finished if config.eval_metric in evaluated[t.run_id]]
    if not ranked:
        raise RuntimeError(f"no finished trial has the evaluation metric {config.eval_metric!r}")
    pick = min if config.eval_mode == "min" else max
    best = pick(ranked, key=lambda t: evaluated[t.run_id][config.eval_metric])
    tracker.set_tags(tracker.parent_run_id, {"sweep.best_trial": best.trial_id, "sweep.best_run_id": best.run_id})
    tracker.set_tags(best.run_id, {"sweep.best": "true"})
    table = ablation_markdown(labels, evaluated, best.run_id)
    tracker.client.log_text(tracker.parent_run_id, table, artifact_file="eval/ablation.md")
    if results_dir:
        Path(results_dir).mkdir(parents=True, exist_ok=True)
        Path(results_dir, "ablation.md").write_text(table)
    return (best.run_id, best.export_uri), evaluated


ABLATION_COLUMNS = (
    ("table/student-add-1/fid", "FID 1 step", 2),
    ("table/student-add-4/fid", "FID 4 steps", 2),
    ("student_alignment", "alignment 1 step", 3),
    ("student_recall", "recall 1 step", 3),
    ("fid_ratio", "FID ÷ teacher", 2),
)


def trial_label(params: dict[str, str]) -> dict[str, str]:
    """What a trial's search-space point set, from its ``trial.*`` params (a variant by its label)."""
    import ast

    label = {}
    for key, value in params.items():
        if not key.startswith("trial."):
            continue
        key = key.removeprefix("trial.")
        if key == VARIANT:
            try:
                variant = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                variant = {}
            value = variant.get("label") or ", ".join(f"{k}={v}" for k, v in variant_fields(variant).items())
        label[key] = value
    return label


def ablation_markdown(labels: dict[str, dict], evaluated: dict[str, dict], best: str | None = None) -> str:
    """One row per trial: the swept values that differ between trials, then its evaluation."""
    keys = sorted({k for v in labels.values() for k in v})
    varying = [k for k in keys if len({v.get(k) for v in labels.values()}) > 1] or keys
    columns = [c for c in ABLATION_COLUMNS if any(c[0] in m for m in evaluated.values())]
    lines = ["| " + " | ".join(varying + [c[1] for c in columns]) + " |", "|" + "---|" * (len(varying) + len(columns))]
    for run_id, metrics in evaluated.items():
        values = [str(labels[run_id].get(k, "")) for k in varying]
        values += [f"{metrics[c[0]]:.{c[2]}f}" if c[0] in metrics else "–" for c in columns]
        mark = " **(best)**" if run_id == best else ""
        lines.append("| " + " | ".join(values) + mark + " |")
    return "\n".join(lines) + "\n"


def local_copy(uri: str, spec: JobSpec, folder: Path) -> Path:
    """The exported student as a local folder (downloaded from object storage when it is there)."""
    import pyarrow.fs as pafs

    from workers.data.storage import resolve, split_uri, storage_options

    if split_uri(uri)[0] == "file":
        return Path(split_uri(uri)[1])
    fs, path = resolve(uri, storage_options(spec.storage.options, "storage.options"))
    target = folder / "student"
    pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


def _evaluate_and_register(
    spec, tracker, result, evaluation, evaluator, promotion_gates, reference, evaluated=None
) -> None:
    from orchestrator.pyfunc import log_student_model

    if not result.export_uri:
        raise RuntimeError("the training run exported no student: nothing to evaluate or register")
    run_id = tracker.parent_run_id if result.best_run_id is None else result.best_run_id
    folder = Path(tempfile.mkdtemp(prefix="add-export-"))
    try:
        student_dir = local_copy(result.export_uri, spec, folder)
        config = evaluation if evaluation is not None else eval_section(spec)
        if evaluated and run_id in evaluated:  # a sweep that evaluated every trial
            result.evaluation = evaluated[run_id]
        else:
            result.evaluation = _evaluate(spec, tracker, run_id, student_dir, config, evaluator, reference)
        prompts = list(config.prompts) if config is not None else list(spec.train.sample_prompts) or ["0"]
        info = log_student_model(run_id, str(student_dir), [str(p) for p in prompts], tracking_uri=tracker.tracking_uri)
        name = spec.tracking.model_name or spec.name
        tags = eval_tags(result.evaluation, promotion_gates) | {
            "job.name": spec.name,
            "job.parent_run_id": tracker.parent_run_id,
            "export.uri": result.export_uri,
        }
        version = register_candidate(tracker.client, name, info.model_uri, run_id, model_id=info.model_id, tags=tags)
        result.model_name, result.model_version = name, version.version
        tracker.set_tags(
            tracker.parent_run_id,
            {"result.model_name": name, "result.model_version": version.version, "result.best_run_id": run_id},
        )
        tracker.set_tags(run_id, {"registered.model": f"{name}/{version.version}"})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _evaluate(spec, tracker, run_id, student_dir, config, evaluator, reference, results_dir=None) -> dict[str, float]:
    """Evaluate and log; an evaluation that cannot run is recorded (``eval.error``), never fatal:
    the version is still registered, and its gates then fail as ``missing``."""
    from workers.eval.reference import reference_images

    if config is None:
        tracker.set_tags(run_id, {"eval.error": "no eval prompts (eval.prompts or train.sample_prompts)"})
        return {}
    started = time.monotonic()
    try:
        evaluator = evaluator or default_evaluator(spec)
        if reference is None and getattr(evaluator, "needs_reference", True) and evaluator.features is not None:
            reference = reference_images(
                spec.data.uri,
                len(config.prompts) * config.images_per_prompt,
                spec.data.resolution,
                spec.data.channels,
                _data_storage(spec),
            )
        teacher_kwargs = spec.teacher.load_kwargs()
        outcome = evaluator.evaluate_paths(student_dir, spec.teacher.source, config, reference, **teacher_kwargs)
    except Exception as err:  # noqa: BLE001
        log.warning("evaluation failed: %s", tracker.redact(f"{type(err).__name__}: {err}"))
        tracker.set_tags(run_id, {"eval.error": f"{type(err).__name__}: {err}"[:5000]})  # set_tags redacts
        return {}
    tracker.log_metrics(run_id, {f"eval/{k}": v for k, v in outcome.metrics.items()}, step=0)
    artifacts = getattr(outcome, "artifacts", None) or {"comparison.png": outcome.comparison_grid()}
    for name, value in artifacts.items():
        if isinstance(value, str):
            tracker.log_text(run_id, value, f"eval/{name}")  # redacted
        else:
            tracker.client.log_image(run_id, value, artifact_file=f"eval/{name}")
    results_dir = results_dir or (spec.eval.table.results_dir if spec.eval.table is not None else None)
    if results_dir and hasattr(outcome, "write"):
        outcome.write(results_dir)
    measured = getattr(outcome, "config", None) or config  # with the teacher's own solver filled in
    teacher = f"{measured.teacher_solver} {measured.teacher_steps} steps, CFG {measured.guidance_scale:g}"
    tracker.set_tags(run_id, {"eval.teacher": teacher, "timing.eval_s": f"{time.monotonic() - started:.1f}"})
    return outcome.metrics


def _data_storage(spec):
    from workers.data.storage import storage_options

    return storage_options(spec.data.storage_options, "data.storage_options")
