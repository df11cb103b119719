"""Sweeps: a 4-trial ASHA sweep of a tiny job through Ray Tune over the Ray Train trainer, tracked in MLflow."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from orchestrator.controller import run_job
from orchestrator.registry import CANDIDATE
from orchestrator.spec import JobSpec, SweepSpec
from orchestrator.sweep import (
    TRIAL_TAG,
    TrialRunCloser,
    concurrent_trials,
    param_space,
    reports_per_run,
    trial_resources,
    trial_spec,
    with_values,
)
from orchestrator.tracking import JobTracker
from tests.mlflow_server import tiny_job

SEARCH = {"train.lr_student": {"loguniform": [1e-5, 1e-3]}, "loss.lambda_distill": {"choice": [1.0, 2.5]}}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_search_space_and_overrides(tmp_path):
    from ray.tune.search.sample import Categorical, Float

    space = param_space(SEARCH | {"train.seed": 3, "train.batch_size": {"type": "grid", "values": [4, 8]}})
    assert isinstance(space["train.lr_student"], Float) and isinstance(space["loss.lambda_distill"], Categorical)
    assert space["train.seed"] == 3 and space["train.batch_size"] == {"grid_search": [4, 8]}
    with pytest.raises(ValueError, match="unknown search domain"):
        param_space({"train.seed": {"normal": [0, 1]}})

    spec = JobSpec.model_validate(tiny_job(tmp_path, "http://unused", "overrides"))
    trial = with_values(spec, {"train.lr_student": 3e-4, "loss.lambda_distill": 1.0})
    assert (trial.train.lr_student, trial.loss.lambda_distill, trial.train.steps) == (3e-4, 1.0, 4)
    with pytest.raises(ValueError, match="'train.lr' is not a field"):
        with_values(spec, {"train.lr": 1.0})
    with pytest.raises(ValueError, match="greater than 0"):
        with_values(spec, {"train.lr_student": -1.0})
    both = with_values(spec, {"variant": {"label": "x", "loss.lambda_adv": 0.0, "train.seed": 5}})
    assert (both.loss.lambda_adv, both.train.seed) == (0.0, 5)


def test_a_variants_relative_folder_is_the_drivers_not_the_trials(tmp_path, monkeypatch):
    driver, trial_dir = tmp_path / "driver", tmp_path / "trial"
    (driver / "runs" / "dinov2").mkdir(parents=True)
    trial_dir.mkdir()
    spec = JobSpec.model_validate(tiny_job(tmp_path, "http://unused", "paths"))
    dinov2 = {"label": "dinov2", "discriminator.backbone": "dinov2", "discriminator.dinov2": "runs/dinov2"}
    variant = {"variant": dinov2}
    monkeypatch.chdir(trial_dir)  # Tune runs a trial in its own working directory
    trial = trial_spec(spec.model_dump(mode="json"), variant, str(driver))
    assert trial.discriminator.dinov2 == str(driver / "runs" / "dinov2")
    hub = {"variant": {"label": "hub", "discriminator.dinov2": "facebook/dinov2-small"}}
    assert trial_spec(spec.model_dump(mode="json"), hub, str(driver)).discriminator.dinov2 == "facebook/dinov2-small"


def test_variants_are_checked_field_by_field(tmp_path):
    from orchestrator.errors import JobSpecError
    from orchestrator.spec import validate_job

    job = tiny_job(tmp_path, "http://unused", "variants")
    ok = {"search_space": {"variant": {"grid": [{"label": "a", "loss.lambda_adv": 0.0}]}}}
    assert validate_job(job | {"sweep": ok}).sweep is not None
    for variant, message in (
        ({"loss.lambda_adverse": 0.0}, "'loss.lambda_adverse' is not a field"),
        ({"loss.lambda_adv": 0.0, "loss.lambda_distill": 0.0}, "both 0"),
        ({"label": "only a label"}, "a variant is a mapping"),
    ):
        with pytest.raises(JobSpecError, match=message):
            validate_job(job | {"sweep": {"search_space": {"variant": {"grid": [variant]}}}})


def test_trials_fill_the_cluster(tmp_path, ray_cluster):
    spec = JobSpec.model_validate(tiny_job(tmp_path, "http://unused", "budget"))
    config = SweepSpec(search_space=SEARCH)
    assert trial_resources(spec, config) == {"CPU": 2.25, "GPU": 0}  # driver fn + 1 worker + Ray Data
    assert concurrent_trials(spec, config) == 3  # of 8 logical CPUs
    assert concurrent_trials(spec, SweepSpec(search_space=SEARCH, max_concurrent_trials=2)) == 2
    assert reports_per_run(spec) == 4


def test_stopped_trial_run_is_closed_and_marked(mlflow_server, tmp_path):
    """ASHA kills a stopped trial with its trainer: the controller-side callback ends its run."""
    spec = JobSpec.model_validate(tiny_job(tmp_path, mlflow_server.url, "closer"))
    tracker = JobTracker(spec)
    tracker.start_parent()
    runs = {t: tracker.start_child(spec, f"trial-{t}", tags={TRIAL_TAG: t}) for t in ("a", "b", "c")}
    closer = TrialRunCloser(tracker, full_reports=4)
    closer.on_trial_complete(0, [], SimpleNamespace(trial_id="a", last_result={"training_iteration": 2}))
    closer.on_trial_complete(0, [], SimpleNamespace(trial_id="b", last_result={"training_iteration": 4}))
    closer.on_trial_error(0, [], SimpleNamespace(trial_id="c", last_result={}))
    client = mlflow_server.client()
    got = {t: client.get_run(r) for t, r in runs.items()}
    assert {t: r.info.status for t, r in got.items()} == {"a": "FINISHED", "b": "FINISHED", "c": "FAILED"}
    assert got["a"].data.tags["sweep.early_stopped"] == "true" and got["b"].data.tags["sweep.early_stopped"] == "false"
    tracker.end_all("FINISHED")


def test_asha_sweep_of_four_trials_registers_the_best(mlflow_server, ray_cluster, tmp_path):
    sweep = {
        "search_space": SEARCH,
        "metric": "loss/distill",
        "mode": "min",
        "num_samples": 4,
        "max_concurrent_trials": 2,  # on 2 cores; the default fills the cluster (see above)
        "scheduler": "asha",
        "grace_period": 1,
        "reduction_factor": 2,
    }
    job = tiny_job(tmp_path, mlflow_server.url, "tiny-sweep", train={"sample_every": 4}, sweep=sweep)
    result = run_job(JobSpec.model_validate(job))

    client = mlflow_server.client()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.trials"] == "4"
    children = [client.get_run(r) for r in result.child_run_ids]
    assert len(children) == 4 and len({c.data.tags[TRIAL_TAG] for c in children}) == 4
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert float(child.data.params["trial.train.lr_student"]) == float(child.data.params["train.lr_student"])
        assert child.data.params["loss.lambda_distill"] in ("1.0", "2.5")
        assert "loss/distill" in child.data.metrics and client.get_metric_history(child.info.run_id, "loss/distill")
    finished = [c for c in children if c.data.tags.get("export.uri")]
    early = [c for c in children if c.data.tags.get("sweep.early_stopped") == "true"]
    assert finished and len(finished) + len(early) == 4
    best = min(finished, key=lambda c: c.data.metrics["loss/distill"])  # each run's last report
    assert result.best_run_id == best.info.run_id == parent.data.tags["sweep.best_run_id"]
    assert best.data.tags["sweep.best"] == "true" and "eval/student_fid" in best.data.metrics
    version = client.get_model_version_by_alias("tiny-sweep", CANDIDATE)
    assert version.run_id == best.info.run_id and version.version == result.model_version


def test_ablation_sweep_evaluates_every_trial_and_registers_the_best_by_its_evaluation(
    mlflow_server, ray_cluster, tmp_path
):
    variants = [
        {"label": "adversarial only", "loss.lambda_distill": 0.0},
        {"label": "distillation only", "loss.lambda_adv": 0.0},
        {"label": "both, sds", "loss.weighting": "sds", "train.lr_student": 2e-5},
    ]
    sweep = {
        "search_space": {"variant": {"grid": variants}},
        "num_samples": 1,
        "max_concurrent_trials": 2,
        "scheduler": "fifo",
        "evaluate_all": True,
        "eval_metric": "student_fid",
        "eval_mode": "min",
    }
    results = tmp_path / "results"
    table = {
        "num_images": 8,
        "batch_size": 4,
        "teacher_samplers": ["ddim:2"],
        "student_steps": [1, 4],
        "reference_sampler": "ddim:2",
        "reference_images": 16,
        "results_dir": str(results),
    }
    job = tiny_job(tmp_path, mlflow_server.url, "tiny-ablation", sweep=sweep, eval={"teacher_steps": 2, "table": table})
    result = run_job(JobSpec.model_validate(job))

    client = mlflow_server.client()
    children = [client.get_run(r) for r in result.child_run_ids]
    assert len(children) == 3
    fids = {c.info.run_id: c.data.metrics["eval/student_fid"] for c in children}  # every trial evaluated
    assert result.best_run_id == min(fids, key=fids.get)
    assert client.get_model_version_by_alias("tiny-ablation", CANDIDATE).run_id == result.best_run_id

    for child in children:  # each trial ran the fields its variant set
        lambdas = (child.data.params["loss.lambda_adv"], child.data.params["loss.lambda_distill"])
        assert lambdas in {("1.0", "0.0"), ("0.0", "2.5"), ("1.0", "2.5")}
        if lambdas == ("1.0", "2.5"):
            assert child.data.params["loss.weighting"] == "sds" and child.data.params["train.lr_student"] == "2e-05"
    ablation = (results / "ablation.md").read_text().splitlines()
    assert ablation[0].startswith("| variant |") and "FID 1 step" in ablation[0]
    labels = {line.split("|")[1].strip() for line in ablation[2:]}
    assert labels == {"adversarial only", "distillation only", "both, sds"}
    assert len(ablation) == 2 + 3 and sum("**(best)**" in line for line in ablation) == 1
    for child in children:  # each trial's own table beside the ablation
        assert (results / child.info.run_name / "table.md").is_file()
    logged = client.download_artifacts(result.parent_run_id, "eval/ablation.md", str(tmp_path))
    assert open(logged).read().splitlines() == ablation


def test_a_failed_trial_is_in_the_summary_the_exit_code_and_the_parent_run(mlflow_server, ray_cluster, tmp_path):
    """Two trials, one on a shard set with an unreadable shard: the job exits 1 naming the trial and its
    error, the parent run says how many failed and why, the failed trial's run is FAILED with its error."""
    import yaml
    from click.testing import CliRunner

    from orchestrator.cli import main
    from tests.test_data_loss import scramble, shards

    good, broken = shards(tmp_path / "good"), shards(tmp_path / "broken")
    scramble(tmp_path / "broken" / "shard-00001.parquet")
    sweep = {"search_space": {"data.uri": {"grid": [good, broken]}}, "scheduler": "fifo", "num_samples": 1,
             "max_concurrent_trials": 2}  # fmt: skip
    job = tiny_job(tmp_path, mlflow_server.url, "tiny-failing-sweep", train={"sample_every": 4}, sweep=sweep)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(job))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1, result.output
    assert "1 of 2 sweep trials failed (sweep.max_failed_trials = 0)" in result.output
    assert "shard-00001.parquet" in result.output

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("tiny-failing-sweep").experiment_id
    runs = client.search_runs([experiment])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED" and parent.data.tags["sweep.failed"] == "1"
    assert parent.data.tags["sweep.trials"] == "2" and parent.data.tags["sweep.finished"] == "1"
    (failed,) = json.loads(parent.data.tags["sweep.failed_trials"])
    assert "DataError" in failed["error"] and "shard-00001.parquet" in failed["error"]
    trial = client.get_run(failed["run_id"])
    assert trial.info.status == "FAILED" and "shard-00001.parquet" in trial.data.tags["sweep.error"]
    assert "SweepTrialsFailed" in parent.data.tags["job.error"]


def test_failed_trials_within_the_threshold_are_reported_and_the_job_goes_on(mlflow_server, tmp_path, monkeypatch):
    from orchestrator import controller, sweep
    from orchestrator.sweep import TrialOutcome

    spec = JobSpec.model_validate(tiny_job(tmp_path, mlflow_server.url, "threshold"))
    tracker = JobTracker(spec)
    tracker.start_parent()
    r1, r2 = (tracker.start_child(spec, f"trial-{t}", tags={TRIAL_TAG: t}) for t in ("t1", "t2"))
    trials = [
        TrialOutcome("t1", r1, {"loss/distill": 0.5}, export_uri="s3://x/t1"),
        TrialOutcome("t2", r2, error="RuntimeError: boom"),
    ]
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: (trials[0], trials))
    config = SweepSpec(search_space=SEARCH, max_failed_trials=1)
    result = controller.JobResult(parent_run_id=tracker.parent_run_id)
    best, _ = controller._train_sweep(spec, config, tracker, None, {}, None, result)
    assert best == (r1, "s3://x/t1")
    assert result.trials == 2
    assert result.failed_trials == [{"trial": "t2", "run_id": r2, "error": "RuntimeError: boom"}]
    tags = mlflow_server.client().get_run(tracker.parent_run_id).data.tags
    assert tags["sweep.failed"] == "1" and "boom" in tags["sweep.failed_trials"]
    with pytest.raises(controller.SweepTrialsFailed, match="1 of 2 sweep trials failed"):
        controller._train_sweep(spec, SweepSpec(search_space=SEARCH), tracker, None, {}, None, result)
    tracker.end_all("FINISHED")


def test_a_failed_trial_is_resumed_only_when_a_retry_can_help():
    from orchestrator.sweep import fit_with_retries
    from workers.train.trainer import DataError

    built, retried = [], []

    def flaky(failures: list[BaseException]):
        def fit(trainer):
            if failures:
                raise failures.pop(0)
            return f"fitted {trainer}"

        return fit

    def build():
        built.append(len(built))
        return len(built)

    def on_retry(attempt, reason):
        retried.append((attempt, reason))

    assert fit_with_retries(build, flaky([KeyError("_MLFLOW_TELEMETRY_SESSION_ID")]), 1, on_retry) == "fitted 2"
    assert retried == [(1, "KeyError: '_MLFLOW_TELEMETRY_SESSION_ID'")]  # a new trainer resumes the run
    with pytest.raises(RuntimeError):
        fit_with_retries(build, flaky([RuntimeError("a"), RuntimeError("b")]), 1, on_retry)
    built.clear()
    for unmendable in (DataError("shard x: cannot read"), ValueError("bad value")):
        with pytest.raises(type(unmendable)):
            fit_with_retries(build, flaky([unmendable]), 3, on_retry)
    assert built == [0, 1]  # each built once: never retried
