"""Sweeps: Ray Tune over the Ray Train trainer, one MLflow child run per trial, ASHA by default.

``Tuner(train_driver_fn, param_space=..., tune_config=TuneConfig(...))`` (Tune with Train V2): each
trial's driver function applies the trial's values to the job spec, opens its child run, builds
the trainer with a trial-specific run name and fits it; Ray Train's ``TuneReportCallback`` hands
every report to Tune (one report = one ``training_iteration``, what ASHA counts). Metrics reach
MLflow from rank 0 through ``TrackingCallback``. Trials that ASHA stops are killed with their
trainer, so ``TrialRunCloser`` (a Tune callback in the controller) ends their runs.

Every trial is accounted for: a trial that fails (an error, not an ASHA stop) has its run ended
FAILED with the tag ``sweep.error``, and ``TrialOutcome.error`` a one-line reason; the controller
puts them in the job's summary and its parent run, and fails the job when more than
``max_failed_trials`` failed. Worker failures inside a trial are retried by Ray Train
(``resources.max_failures``); a trial that fails anyway is resumed from its last checkpoint up to
``trial_retries`` times, in the same run, unless retrying cannot help (``fit_with_retries``: bad
data, a non-finite loss, a bad value come back).

Search space: a mapping from dotted spec paths to domains, each ``{"loguniform": [lo, hi]}``,
``{"uniform": [lo, hi]}``, ``{"randint": [lo, hi]}``, ``{"choice": [...]}``, ``{"grid": [...]}``, or
the same as ``{"type": "loguniform", "low": lo, "high": hi}`` / ``{"type": "choice", "values": [...]}``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ray
from pydantic import BaseModel
from ray import tune

from orchestrator.spec import VARIANT, JobSpec, SweepSpec, set_field, variant_fields
from orchestrator.tracking import JobTracker, TrackingCallback

TRIAL_TAG = "sweep.trial_id"
DOMAINS = ("loguniform", "uniform", "randint", "choice", "grid", "quniform", "qloguniform")


@dataclass
class TrialOutcome:
    trial_id: str
    run_id: str | None
    metrics: dict = field(default_factory=dict)  # the last report
    export_uri: str | None = None  # set when the trial ran to the end and exported its student
    error: str | None = None


def domain(spec) -> object:
    """A Tune domain from its job-YAML form."""
    if not isinstance(spec, Mapping):
        return spec  # a constant
    if "type" in spec:
        kind = spec["type"]
        args = spec.get("values") if kind in ("choice", "grid") else [spec.get("low"), spec.get("high")]
        if kind in ("quniform", "qloguniform"):
            args = [*args, spec.get("q")]
        spec = {kind: args}
    if len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ValueError(f"unknown search domain {dict(spec)!r}: use one of {', '.join(DOMAINS)}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return tune.choice(list(args))
    if kind == "grid":
        return tune.grid_search(list(args))
    return getattr(tune, kind)(*args)


def param_space(search_space: Mapping[str, object]) -> dict[str, object]:
    """Tune's param space of ``sweep.search_space`` (its domains as validated models, or as YAML mappings)."""
    return {
        path: domain(value.model_dump() if isinstance(value, BaseModel) else value)
        for path, value in search_space.items()
    }


def with_values(spec: JobSpec, values: Mapping[str, object]) -> JobSpec:
    """``spec`` with a trial's dotted-path values set, validated again (a bad path or value names the
    field), as a single run (no ``sweep`` section)."""
    data = spec.model_dump(mode="json")
    values = dict(values)
    if VARIANT in values:  # one search-space point that sets several fields
        values = {k: v for k, v in values.items() if k != VARIANT} | variant_fields(values[VARIANT])
    for path, value in values.items():
        if set_field(data, path, value) is not None:
            raise ValueError(f"sweep.search_space: {path!r} is not a field of the job spec")
    # a trial is one run: its search space, checked against the base job, says nothing about it
    return JobSpec.model_validate(data | {"sweep": None})


def trial_spec(spec_data: dict, values: Mapping[str, object], driver_cwd: str | None) -> JobSpec:
    """The job spec of one trial: the base job with the trial's values, whose relative local paths
    (a variant's ``discriminator.dinov2`` folder, say) are the driver's: a trial runs in its own
    working directory."""
    spec = with_values(JobSpec.model_validate(spec_data), values)
    return spec.localized(Path(driver_cwd)) if driver_cwd else spec


def reports_per_run(spec: JobSpec) -> int:
    """How many reports a full run makes: every ``log_every`` steps and at each checkpoint."""
    t = spec.train
    logged = set(range(t.log_every, t.steps + 1, t.log_every))
    saved = set(range(t.checkpoint_every, t.steps + 1, t.checkpoint_every))
    return len(logged | saved | {t.steps})


def trial_resources(spec: JobSpec, config: SweepSpec) -> dict[str, float]:
    r = spec.resources
    cpus = config.trial_cpus + r.num_workers * r.cpus_per_worker + r.data_cpus
    return {"CPU": cpus, "GPU": r.num_workers * r.gpus_per_worker}


def concurrent_trials(spec: JobSpec, config: SweepSpec) -> int:
    """As many trials as the cluster holds at once (at least one)."""
    if config.max_concurrent_trials:
        return config.max_concurrent_trials
    total = ray.cluster_resources()
    need = trial_resources(spec, config)
    fits = [math.floor(total.get(k, 0) / v) for k, v in need.items() if v > 0]
    return max(1, min(fits or [1]))


def trial_run(tracker: JobTracker, trial_id: str):
    """The child run of a trial (found by its tag), or None when the trial never started one."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'",
    )
    return runs[0] if runs else None


class TrialRunCloser(tune.Callback):
    """Ends each trial's child run when Tune is done with the trial (ASHA kills its driver function
    with the trainer, so the trial cannot end its run itself)."""

    def __init__(self, tracker: JobTracker, full_reports: int):
        self.tracker, self.full_reports = tracker, full_reports

    def _run(self, trial) -> str | None:
        run = trial_run(self.tracker, trial.trial_id)
        return run.info.run_id if run else None

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        if run_id:
            reports = (trial.last_result or {}).get("training_iteration", 0)
            early = reports < self.full_reports
            self.tracker.set_tags(run_id, {"sweep.early_stopped": str(early).lower()})
            self.tracker.end(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run = trial_run(self.tracker, trial.trial_id)
        if run:
            if "sweep.error" not in run.data.tags:  # the trial did not get to say why (it was killed)
                error = trial.get_error() if hasattr(trial, "get_error") else None
                self.tracker.set_tags(run.info.run_id, {"sweep.error": error_line(error or "failed (see its log)")})
            self.tracker.end(run.info.run_id, "FAILED")


def error_line(error: object) -> str:
    """A failed trial's error in one line: the last ``Type: message`` line of Tune's report (which
    carries the remote traceback), at most 300 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    typed = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b.*:", line)]
    line = (typed or lines or ["unknown error"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def fit_with_retries(
    build: Callable[[], object], fit: Callable[[object], object], retries: int, on_retry: Callable[[int, str], None]
):
    """``fit(build())``, built and fitted again (a trainer of the same name resumes from its last
    checkpoint) up to ``retries`` times when it fails in a way a retry can mend; bad data
    (``DataError``), a non-finite loss and a bad value (``ValueError``) are raised at once."""
    from workers.train.trainer import DataError, NonFiniteLossError

    attempt = 0
    while True:
        try:
            return fit(build())
        except (DataError, NonFiniteLossError, ValueError):
            raise
        except Exception as err:
            if attempt >= retries:
                raise
            attempt += 1
            on_retry(attempt, error_line(f"{type(err).__name__}: {err}"))


def train_driver_fn(
    config: dict,
    *,
    spec_data: dict,
    tracker: JobTracker,
    storage_path: str | None,
    trainer_kwargs: dict,
    build_trainer: Callable | None = None,
    driver_cwd: str | None = None,
    retries: int = 0,
) -> None:
    """One trial: the job spec with the trial's values, a child run, a trainer fitted to the end
    (resumed from its last checkpoint up to ``retries`` times, see ``fit_with_retries``)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from workers.train.trainer import build_trainer as default_build_trainer
    from workers.train.trainer import run_training

    context = tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    spec = trial_spec(spec_data, config, driver_cwd)
    run_name = f"{spec.name}-{trial_name}"
    run_id = tracker.start_child(
        spec, run_name, params={f"trial.{k}": v for k, v in config.items()}, tags={TRIAL_TAG: trial_id}
    )
    def build():
        trainer = (build_trainer or default_build_trainer)(
            spec,
            storage_path=storage_path,
            run_name=run_name,
            callbacks=[TrackingCallback(tracker.tracking_uri, run_id, tracker.redact.names)],
            **trainer_kwargs,
        )
        trainer.run_config.callbacks.append(TuneReportCallback())  # until build_trainer takes run callbacks
        return trainer

    def retried(attempt: int, reason: str) -> None:
        tracker.set_tags(run_id, {"sweep.retries": attempt, f"sweep.retry_{attempt}": reason})

    try:
        outcome = fit_with_retries(build, run_training, retries, retried)
    except BaseException as err:
        tracker.set_tags(run_id, {"sweep.error": error_line(f"{type(err).__name__}: {err}")})
        tracker.end(run_id, "FAILED")
        raise
    summary = outcome.return_value or {}
    tracker.log_data_report(run_id, summary.get("data"), summary.get("step"))
    tracker.end(run_id, "FINISHED")


def tune_config(spec: JobSpec, config: SweepSpec) -> tune.TuneConfig:
    """How Tune searches: the metric, ASHA (``scheduler: asha``) or none (``fifo`` or null: every trial
    runs to the end), and a variant generator seeded with ``sweep.seed`` (null: random)."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    scheduler = None
    if config.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=config.max_t or reports_per_run(spec),
            grace_period=config.grace_period,
            reduction_factor=config.reduction_factor,
            # never stop a trial at max_t itself: that report is its last, and killing it there would
            # lose the export it is about to write; trials past every rung end on their own
            stop_last_trials=False,
        )
    return tune.TuneConfig(
        metric=config.metric,
        mode=config.mode,
        scheduler=scheduler,
        num_samples=config.num_samples,
        # the limit goes to the generator: Tune applies max_concurrent_trials only to Searchers
        search_alg=BasicVariantGenerator(random_state=config.seed, max_concurrent=concurrent_trials(spec, config)),
    )


def run_sweep(
    spec: JobSpec,
    config: SweepSpec,
    tracker: JobTracker,
    *,
    storage_path: str | None = None,
    trainer_kwargs: dict | None = None,
    build_trainer: Callable | None = None,
) -> tuple[TrialOutcome | None, list[TrialOutcome]]:
    """Run the sweep; returns the best finished trial by ``config.metric`` (None if none finished) and all trials."""
    import pyarrow.fs as pafs

    from workers.data.storage import storage_options
    from workers.train.trainer import run_storage

    storage_path = storage_path or spec.storage.uri
    trainable = tune.with_parameters(
        train_driver_fn,
        spec_data=spec.model_dump(mode="json"),
        tracker=tracker,
        storage_path=storage_path,
        trainer_kwargs=trainer_kwargs or {},
        build_trainer=build_trainer,
        driver_cwd=os.getcwd(),
        retries=config.trial_retries,
    )
    fs, path = run_storage(storage_path, storage_options(spec.storage.options, "storage.options"))
    local = isinstance(fs, pafs.LocalFileSystem)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": config.trial_cpus}),
        param_space=param_space(config.search_space),
        tune_config=tune_config(spec, config),
        run_config=tune.RunConfig(
            name=f"{spec.name}-sweep-{tracker.parent_run_id[:8]}",
            storage_path=path,
            storage_filesystem=None if local else fs,
            callbacks=[TrialRunCloser(tracker, reports_per_run(spec))],
        ),
    )
    grid = tuner.fit()
    outcomes = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id")
        run = trial_run(tracker, trial_id) if trial_id else None
        outcomes.append(
            TrialOutcome(
                trial_id=trial_id,
                run_id=run.info.run_id if run else None,
                metrics=dict(result.metrics or {}),
                export_uri=run.data.tags.get("export.uri") if run else None,
                error=error_line(result.error) if result.error else None,
            )
        )
    finished = [o for o in outcomes if o.export_uri and config.metric in o.metrics]
    if not finished:
        return None, outcomes
    pick = min if config.mode == "min" else max
    return pick(finished, key=lambda o: float(o.metrics[config.metric])), outcomes
