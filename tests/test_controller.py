"""A tiny job through the controller against a real MLflow server (artifacts on S3): runs, metrics,
images, the registered candidate, ``generate``, no secret anywhere, and KILLED runs on SIGTERM."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from orchestrator.controller import run_job
from orchestrator.generate import generate, model_uri
from orchestrator.promotion import gates_from_mapping
from orchestrator.registry import CANDIDATE
from orchestrator.spec import JobSpec, PromotionSpec
from orchestrator.tracking import mark_stopped
from tests.mlflow_server import TINY_CAPTIONS, tiny_job

SECRET_ENV = "ADD_TEST_API_TOKEN"
SECRET = "tok-7f3a9c1e-never-in-mlflow"
GATES = PromotionSpec(max_fid_ratio=1.5, alignment_margin=0.1, min_speedup=1.0)  # tiny_job's promotion section


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray with more logical CPUs than cores (trial + training worker + Ray Data), the secret in its env."""
    import ray

    os.environ[SECRET_ENV] = SECRET  # before ray.init: the workers inherit it and resolve the reference
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        os.environ.pop(SECRET_ENV, None)


@pytest.fixture(scope="module")
def job(mlflow_server, ray_cluster, tmp_path_factory):
    """One tiny job, run once for the module's tests."""
    folder = tmp_path_factory.mktemp("job")
    spec = JobSpec.model_validate(
        tiny_job(folder, mlflow_server.url, "tiny-job", env={"API_TOKEN": f"${{env:{SECRET_ENV}}}"})
    )
    started = time.monotonic()
    result = run_job(spec)  # evaluation and gates from the spec's eval and promotion sections
    return spec, result, time.monotonic() - started


def test_job_is_a_parent_run_with_a_child_training_run(job, mlflow_server, tmp_path):
    spec, result, _ = job
    client = mlflow_server.client()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["job.name"] == "tiny-job" and parent.data.tags["result.model_version"] == "1"
    assert len(result.child_run_ids) == 1 and result.best_run_id == result.child_run_ids[0]
    child = client.get_run(result.best_run_id)
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == result.parent_run_id
    # params: the resolved config, flattened, defaults included
    params = child.data.params
    assert params["train.steps"] == "4" and params["teacher.source"] == spec.teacher.source
    assert params["loss.lambda_distill"] == "2.5" and params["env.API_TOKEN"] == f"${{env:{SECRET_ENV}}}"
    # code version: the commit of this checkout
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert child.data.tags["mlflow.source.git.commit"] == commit == parent.data.tags["code.git_commit"]
    # the resolved job YAML with both runs
    for run_id in (result.parent_run_id, result.best_run_id):
        logged = Path(client.download_artifacts(run_id, "job.yaml", str(tmp_path)))
        assert JobSpec.model_validate(yaml.safe_load(logged.read_text())) == spec


def test_metrics_per_step_and_sample_grids(job, mlflow_server):
    _, result, _ = job
    client = mlflow_server.client()
    history = client.get_metric_history(result.best_run_id, "loss/student")
    assert [m.step for m in history] == [1, 2, 3, 4] and all(np.isfinite(m.value) for m in history)
    metrics = client.get_run(result.best_run_id).data.metrics
    assert {"loss/distill", "loss/D", "grad_norm/student", "throughput/samples_per_s"} <= set(metrics)
    # the balance of the two losses and the heads' state, in MLflow and in the job's result (the console)
    assert {"balance/ratio_theta", "balance/cos_theta", "balance/ratio_x", "heads/auc_mean"} <= set(metrics)
    assert result.balance and "‖∇θ L_G‖/‖∇θ λ·L_distill‖" in result.balance and "AUC" in result.balance
    assert client.get_run(result.best_run_id).data.tags["train.balance"] == result.balance
    assert {"eval/student_fid", "eval/teacher_fid", "eval/speedup", "eval/student_alignment"} <= set(metrics)
    # sample grids every train.sample_every = 2 steps, and the evaluation's comparison grid, on S3
    keys = mlflow_server.artifact_keys()
    run_keys = [k for k in keys if f"/{result.best_run_id}/artifacts/" in k]
    samples = sorted(k for k in run_keys if "/images/samples+step+" in k and k.endswith(".png"))
    assert [k.split("+step+")[1].split("+")[0] for k in samples] == ["2", "4"]
    assert any(k.endswith("/eval/comparison.png") for k in run_keys)
    grid = Image.open(io.BytesIO(mlflow_server.read_artifact_object(samples[0])))
    assert grid.size[0] > 16 and grid.size[1] >= 16


def test_student_registered_as_candidate_with_its_evaluation(job, mlflow_server):
    spec, result, _ = job
    client = mlflow_server.client()
    version = client.get_model_version_by_alias(spec.tracking.model_name, CANDIDATE)
    assert version.version == result.model_version and version.run_id == result.best_run_id
    assert float(version.tags["eval/speedup"]) == pytest.approx(result.evaluation["speedup"])
    assert gates_from_mapping(yaml.safe_load(version.tags["promotion/gates"])) == GATES
    assert any("/models/" in k and k.endswith("/artifacts/student/unet/diffusion_pytorch_model.safetensors")
               for k in mlflow_server.artifact_keys())  # fmt: skip


def test_generate_from_the_alias_and_from_the_run(job, mlflow_server, tmp_path):
    spec, result, _ = job
    by_alias = generate(f"models:/{spec.tracking.model_name}@candidate", TINY_CAPTIONS[:3], tmp_path / "a.png",
                        tracking_uri=mlflow_server.url)  # fmt: skip
    by_run = generate(result.best_run_id, TINY_CAPTIONS[:3], tmp_path / "b.png", tracking_uri=mlflow_server.url)
    a, b = np.asarray(Image.open(by_alias)), np.asarray(Image.open(by_run))
    assert a.shape == (2 + 2 * 18, 2 + 2 * 18, 3)  # 3 images of 16 px on a 2×2 grid, 2 px padding
    np.testing.assert_array_equal(a, b)  # the same model, prompts and seed
    assert a[2:18, 2:18].std() > 0  # an image, not the blank padding
    assert model_uri(f"{spec.tracking.model_name}@candidate") == f"models:/{spec.tracking.model_name}@candidate"


def test_secret_given_by_reference_appears_nowhere(job, mlflow_server):
    assert mlflow_server.find_value(SECRET) == []
    assert mlflow_server.find_value(f"${{env:{SECRET_ENV}}}")  # the scan does see the reference it was given


def test_sigterm_ends_the_runs_killed(mlflow_server, ray_cluster, tmp_path):
    """``ray job stop`` sends SIGTERM to the entrypoint: the controller ends its runs KILLED and exits 143."""
    spec = tiny_job(tmp_path, mlflow_server.url, "stopped-job", train={"steps": 400, "checkpoint_every": 400})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "ADD_SUBMISSION_ID": "raysubmit_test"}
    log = open(tmp_path / "controller.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(path)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])  # fmt: skip
    client = mlflow_server.client()
    try:
        deadline = time.monotonic() + 240
        while True:  # until the training workers started (the main thread is then blocked in trainer.fit())
            experiment = client.get_experiment_by_name("stopped-job")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if any("train.world_size" in r.data.tags for r in runs):
                break
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "controller.log").read_text()
            time.sleep(1)
        proc.send_signal(signal.SIGTERM)  # what ray job stop does: SIGTERM, then SIGKILL 3 s later
        try:
            code = proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=30)
        # it exits 143 by itself, unless a loaded machine made it miss the 3 s: what counts is that its runs
        # were ended before the SIGKILL (below)
        assert code in (128 + signal.SIGTERM, -signal.SIGKILL), (tmp_path / "controller.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["job.submission_id"] == "raysubmit_test" and parent.data.tags["job.stopped_by"] == "SIGTERM"
    assert mark_stopped(mlflow_server.url, submission_id="raysubmit_test") == []  # nothing left running


# ---- the evaluator and the pyfunc model on their own (no server, no Ray) ---------------------------------


@pytest.fixture(scope="module")
def class_student(tmp_path_factory):
    """A class-conditioned pixel teacher and its (untrained) exported student."""
    from tests.tiny_models import save_tiny_pixel_unet
    from workers.add.components import load_teacher
    from workers.add.export import export_student
    from workers.add.student import Student

    folder = tmp_path_factory.mktemp("class-student")
    source = save_tiny_pixel_unet(folder / "teacher", conditioning="class")
    teacher = load_teacher(str(source))
    return source, export_student(Student(teacher), teacher, folder / "student")


def test_frechet_distance_matches_the_closed_form():
    from scipy import linalg

    from workers.eval.frechet import FeatureStats, frechet_distance

    rng = np.random.default_rng(0)
    a, b = FeatureStats.of(rng.normal(size=(400, 6))), FeatureStats.of(rng.normal(size=(400, 6)) * 1.5 + 0.3)
    covmean = linalg.sqrtm(a.sigma @ b.sigma).real
    expected = ((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma + b.sigma - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    few = [FeatureStats.of(rng.normal(size=(5, 64))) for _ in range(2)]  # singular Σ: fewer samples than dims
    assert np.isfinite(frechet_distance(*few)) and frechet_distance(*few) > 0


def test_speed_is_a_warmed_up_median():
    from workers.eval.speed import ms_per_image

    calls = []

    def sample(n):
        calls.append(n)
        time.sleep(0.02 if len(calls) > 1 else 0.3)  # a slow first (warm-up) call is not timed

    assert 20 / 4 <= ms_per_image(sample, batch_size=4, warmup=1, repeats=3) < 150 / 4
    assert calls == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="at least 3"):
        ms_per_image(sample, 4, repeats=2)


def test_evaluator_compares_student_and_teacher(class_student):
    import torch

    from workers.eval import EvalSpec, Evaluator

    source, student = class_student
    seen = []

    def recall(samples):  # the hook the classifier-based metrics (recall, class accuracy) will use
        seen.append(samples)
        return {"student_recall": 0.5}

    evaluator = Evaluator(TinyFeaturesForTest(), lambda x, p: x.mean(dim=(1, 2, 3)), extra_metrics=[recall])
    config = EvalSpec(prompts=["1", "2"], images_per_prompt=3, teacher_steps=8, guidance_scale=2.0, speed_batch_size=4)
    reference = torch.rand(6, 3, 16, 16)
    result = evaluator.evaluate_paths(student, source, config, reference)
    m = result.metrics
    assert {"student_fid", "teacher_fid", "fid_ratio", "student_alignment", "teacher_alignment"} <= set(m)
    assert m["fid_ratio"] == pytest.approx(m["student_fid"] / m["teacher_fid"])
    assert m["speedup"] > 1 and m["student_recall"] == 0.5  # speed: 1 network call against 8 steps × 2 (CFG)
    assert seen[0].student.shape == seen[0].teacher.shape == (6, 3, 16, 16)
    assert seen[0].prompts == ["1", "1", "1", "2", "2", "2"]
    assert result.comparison_grid().size == (2 + 2 * 18, 2 + 2 * 18)
    without_reference = evaluator.evaluate_paths(student, source, config).metrics
    assert "student_teacher_fd" in without_reference and "student_fid" not in without_reference


class TinyFeaturesForTest:
    def __call__(self, images):
        return images.mean(dim=(2, 3))  # per-channel means: a 3-d feature space


def test_pyfunc_turns_prompts_into_pngs(class_student, tmp_path):
    import mlflow
    import pandas as pd

    from orchestrator.pyfunc import ARTIFACT, StudentModel, student_signature

    _, student = class_student
    signature, example = student_signature(["1", "2"])
    assert [c.name for c in signature.inputs] == ["prompt"] and [c.name for c in signature.outputs] == [
        "prompt",
        "image",
    ]
    mlflow.pyfunc.save_model(
        tmp_path / "model", python_model=StudentModel(), artifacts={ARTIFACT: str(student)}, signature=signature,
        input_example=example, pip_requirements=["torch"],
    )  # fmt: skip
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    out = model.predict(pd.DataFrame({"prompt": ["3", "4", "3"]}), params={"seed": 1})
    images = [np.asarray(Image.open(io.BytesIO(png))) for png in out["image"]]
    assert list(out["prompt"]) == ["3", "4", "3"] and images[0].shape == (16, 16, 3)
    again = model.predict(pd.DataFrame({"prompt": ["3", "4", "3"]}), params={"seed": 1})
    assert list(again["image"]) == list(out["image"])
