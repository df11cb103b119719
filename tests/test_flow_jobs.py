"""The flow-matching recipes (jobs/sd35-medium.yaml, jobs/flux1.yaml) and the job path of a flow teacher.

Each recipe is loaded as shipped, then pointed at a tiny teacher of the same family (tests/tiny_models.py)
and a tiny local shard set, shrunk with ``--set``-style overrides and trained for two steps through the
real Ray Train loop. The spec's teacher fields (``prediction_type: flow``, ``guidance``), the sample shapes
of a packed-latent family, the eval defaults of a flow teacher and ``addctl run`` end to end follow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.errors import JobSpecError
from orchestrator.spec import load_job

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"sd35-medium": "sd3", "flux1": "flux"}
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Tiny stand-ins of the recipes' families: SD3 (MMDiT, three encoders) and guidance-distilled FLUX."""
    from tests.tiny_models import save_tiny_flux, save_tiny_sd3

    folder = tmp_path_factory.mktemp("flow-teachers")
    return {"sd3": save_tiny_sd3(folder / "sd3"), "flux": save_tiny_flux(folder / "flux", guidance_embeds=True)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A tiny local Parquet shard set of 16×16 image-caption rows (the one tiny jobs train on)."""
    from tests.mlflow_server import tiny_job_files

    folder = tmp_path_factory.mktemp("flow-data")
    (folder / "teacher").mkdir()  # tiny_job_files writes a UNet teacher unless one is there: not needed here
    return tiny_job_files(folder, records=32)[1]


def tiny_overrides(family: str, teacher: Path, data: Path, runs: Path) -> list[str]:
    """What shrinks a GPU recipe to the CPU: the tiny teacher and shards, one worker, two steps of 4."""
    return [
        f"teacher.source={teacher}",
        *(["teacher.resolution=16"] if family == "flux" else []),  # FLUX's shift at the data's size
        f"data.uri={data}",
        "data.format=parquet",
        "data.resolution=16",
        "data.storage_options={}",
        "data.local_shuffle_buffer=0",
        "train.steps=2",
        "train.batch_size=4",  # grad_accum 2 (the recipes'): micro-batches of 2, the hinge loss's least
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=1",
        "resources.num_workers=1",
        "resources.gpus_per_worker=0",
        "resources.cpus_per_worker=1",
        "resources.data_cpus=1",
        "resources.max_failures=0",
        f"storage.uri={runs}",
        "storage.options={}",
        "env={}",
    ]


# ---- the recipes as shipped -------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_flow_recipe_is_a_gpu_cluster_job_with_flow_eval(recipe):
    spec = load_job(ROOT / "jobs" / f"{recipe}.yaml")
    r = spec.resources
    assert r.num_workers * r.gpus_per_worker == 8 and r.fsdp
    assert r.num_workers * r.cpus_per_worker + r.data_cpus <= 80  # fits the 8 GPU pods of infra/k8s
    assert spec.data.uri.startswith("s3://") and spec.storage.uri.startswith("s3://")
    assert spec.train.mixed_precision == "bf16" and spec.data.embed_captions
    assert spec.discriminator.backbone == "teacher"  # LADD on the teacher's own tokens
    assert spec.eval.teacher_solver == "euler" and spec.data.resolution == 1024
    if recipe == "flux1":
        assert spec.teacher.guidance == 3.5 and spec.loss.guidance_scale == 1.0 and spec.eval.guidance_scale == 1.0
        assert spec.teacher.resolution == spec.data.resolution and spec.student.lora_rank == 64
        assert load_job(ROOT / "jobs" / "flux1.yaml", ["student.lora_rank=null"]).student.lora_rank is None
    else:
        assert spec.teacher.guidance is None and spec.student.lora_rank is None
        assert load_job(ROOT / "jobs" / "sd35-medium.yaml", ["student.lora_rank=64"]).student.lora_rank == 64


# ---- the spec's teacher fields ----------------------------------------------------------------------


def test_teacher_guidance_is_refused_for_a_teacher_without_a_guidance_embedding(teachers, tmp_path):
    job = {"name": "g", "teacher": {"source": str(teachers["sd3"]), "guidance": 3.5}, "data": {"uri": str(tmp_path)}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    with pytest.raises(JobSpecError) as err:
        load_job(path)
    assert [p.path for p in err.value.problems] == ["teacher.guidance"]
    assert "no guidance embedding" in str(err.value) and "SD3Transformer2DModel" in str(err.value)
    # the guidance-distilled FLUX takes it; the loader refuses the other one the same way
    assert load_job(path, [f"teacher.source={teachers['flux']}"]).teacher.guidance == 3.5
    from workers.add.components import load_teacher

    with pytest.raises(ValueError, match="no guidance embedding"):
        load_teacher(teachers["sd3"], guidance=3.5)


def test_teacher_guidance_reaches_the_teacher_and_the_caption_embeddings(teachers):
    from workers.train.models import caption_encoder

    encoder = caption_encoder(str(teachers["flux"]), guidance=2.0)
    cond = encoder.encode(["a photo of a sneaker", "a black dress"])
    assert cond.guidance.tolist() == [2.0, 2.0]  # what data.embed_captions stores for the loop to read back
    assert caption_encoder(str(teachers["flux"])).encode(["a"]).guidance.tolist() == [3.5]  # FluxPipeline's


def test_prediction_type_flow_is_a_spec_value_and_a_ddpm_override_of_a_flow_teacher_is_an_error(teachers):
    from workers.add.components import load_teacher

    spec = load_job(ROOT / "jobs" / "sd35-medium.yaml", ["teacher.prediction_type=flow"])
    assert spec.teacher.prediction_type == "flow"
    assert load_teacher(teachers["sd3"], **spec.teacher.load_kwargs()).schedule.prediction_type == "flow"
    assert load_teacher(teachers["sd3"], prediction_type="sample").schedule.prediction_type == "sample"
    for wrong in ("epsilon", "v_prediction"):
        with pytest.raises(ValueError, match=f"'{wrong}' does not apply to a flow-matching schedule"):
            load_teacher(teachers["sd3"], prediction_type=wrong)


# ---- sample shapes of the families ------------------------------------------------------------------


def test_sample_shapes_are_the_latents_not_the_networks_input_channels(teachers):
    from workers.add.components import load_teacher
    from workers.eval.images import model_shape

    flux = load_teacher(teachers["flux"], resolution=16)
    assert flux.unet.config.in_channels == 16  # 4 latent channels packed 2×2
    assert model_shape(flux, 3) == (3, 4, 8, 8)  # the latents of a 16-px image (the VAE downsamples by 2)
    assert model_shape(load_teacher(teachers["flux"], resolution=32), 1) == (1, 4, 16, 16)
    assert model_shape(flux, 2, resolution=32) == (2, 4, 16, 16)
    sd3 = load_teacher(teachers["sd3"])
    assert model_shape(sd3, 2) == (2, 4, 8, 8) and model_shape(sd3, 2, resolution=16) == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        model_shape(sd3, 1, resolution=15)


# ---- eval defaults: the teacher's own solver ---------------------------------------------------------


def test_eval_defaults_are_the_teachers_own_solvers():
    from workers.eval.config import DEFAULT_FLOW_TEACHER_SAMPLERS, DEFAULT_TEACHER_SAMPLERS, EvalSpec, TableSpec
    from workers.eval.samplers import Sampler

    spec = EvalSpec(table=TableSpec())
    flow, ddpm = spec.for_teacher(flow=True), spec.for_teacher(flow=False)
    assert (flow.teacher_solver, flow.table.reference_sampler) == ("euler", "euler:50")
    assert (ddpm.teacher_solver, ddpm.table.reference_sampler) == ("ddim", "ddim:50")
    assert flow.table.teacher_samplers == list(DEFAULT_FLOW_TEACHER_SAMPLERS)
    assert ddpm.table.teacher_samplers == list(DEFAULT_TEACHER_SAMPLERS)
    assert {Sampler.parse(s).solver for s in DEFAULT_FLOW_TEACHER_SAMPLERS} == {"euler", "flow-dpmpp"}
    assert spec.teacher_solver is None and spec.table.teacher_samplers is None  # the job's own section is untouched
    chosen = EvalSpec(teacher_solver="flow-dpmpp", table=TableSpec(teacher_samplers=["euler:2"]))
    assert chosen.for_teacher(flow=True).teacher_solver == "flow-dpmpp"  # what a job sets is kept
    assert chosen.for_teacher(flow=True).table.teacher_samplers == ["euler:2"]


def test_a_flow_teacher_is_evaluated_with_default_eval_settings(teachers):
    """The evaluator with an eval section that names no solver: the flow teacher's row is Euler's."""
    from workers.add.components import load_teacher
    from workers.add.student import Student
    from workers.eval.config import EvalSpec
    from workers.eval.evaluator import Evaluator

    teacher = load_teacher(teachers["sd3"])
    student = Student(teacher).requires_grad_(False).eval()
    config = EvalSpec(prompts=["a photo of a sneaker", "a black dress"], images_per_prompt=2, teacher_steps=3,
                      guidance_scale=2.0, speed_repeats=3, speed_warmup=0, speed_batch_size=2)  # fmt: skip
    result = Evaluator(features=None).evaluate(student, teacher, teacher, config)
    assert result.config.teacher_solver == "euler"
    assert result.samples.teacher.shape == result.samples.student.shape == (4, 3, 16, 16)
    assert torch.isfinite(result.samples.teacher).all() and result.samples.teacher.std() > 0
    assert result.metrics["speedup"] > 0
    with pytest.raises(ValueError, match="allowed are euler, flow-dpmpp"):
        Evaluator(features=None).evaluate(
            student, teacher, teacher, config.model_copy(update={"teacher_solver": "ddim"})
        )


# ---- the recipes on tiny stand-ins, through the real Ray Train loop ----------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray with more logical CPUs than cores (training worker + Ray Data + the caption-embedding actor)."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=8, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


class SampleShapes:
    """A loop callback (pickled to the worker) that writes each sample grid's shape and range to ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def on_start(self, info):
        pass

    def on_log(self, step, metrics):
        pass

    def on_samples(self, step, images):
        finite = bool(torch.isfinite(images).all())
        self.path.write_text(json.dumps({"step": step, "shape": list(images.shape), "finite": finite}))

    def on_end(self, summary):
        pass


def train_recipe(recipe: str, teachers, shards, runs: Path, extra: list[str] = ()) -> dict:
    from workers.train.trainer import build_trainer, run_training

    family = RECIPES[recipe]
    overrides = tiny_overrides(family, teachers[family], shards, runs) + ["train.sample_every=2", *extra]
    spec = load_job(ROOT / "jobs" / f"{recipe}.yaml", overrides)
    samples = runs.parent / "samples.json"
    started = time.monotonic()
    result = run_training(build_trainer(spec, export=False, callbacks=[SampleShapes(samples)]))
    TIMINGS[f"{recipe} {' '.join(extra)}".strip()] = time.monotonic() - started
    grid = json.loads(samples.read_text())
    return {"summary": result.return_value, "metrics": result.metrics, "spec": spec, "samples": grid}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        ("sd35-medium", []),  # full fine-tuning, as shipped
        ("sd35-medium", ["student.lora_rank=4"]),  # the documented LoRA variant
        ("flux1", ["student.lora_rank=4", "student.lora_alpha=4"]),  # LoRA (shipped: 64), guidance-distilled
        ("flux1", ["student.lora_rank=null"]),  # the documented full variant
    ],
    ids=["sd35-full", "sd35-lora", "flux1-lora", "flux1-full"],
)
def test_recipe_trains_on_a_tiny_stand_in_of_its_family(recipe, extra, teachers, shards, tmp_path, ray_cluster):
    run = train_recipe(recipe, teachers, shards, tmp_path / "runs", extra)
    summary, metrics, spec = run["summary"], run["metrics"], run["spec"]
    assert summary["status"] == "completed" and summary["step"] == 2
    assert spec.data.embed_captions and spec.train.mixed_precision == "bf16" and spec.resources.fsdp
    for key in ("loss/student", "loss/distill", "loss/D", "grad_norm/student"):
        assert math.isfinite(metrics[key]), (key, metrics[key])
    assert metrics["grad_norm/student"] > 0  # θ learned from both losses through the family's network
    # the loop's one-step sample grid: the family's latents decoded to 16-px RGB (not FLUX's 16 packed channels)
    prompts = len(spec.train.sample_prompts)
    assert run["samples"] == {"step": 2, "shape": [prompts, 3, 16, 16], "finite": True}
    state = metrics["memory/student_state_bytes_max"]
    from workers.add.components import load_teacher

    weights = sum(p.numel() * 4 for p in load_teacher(spec.teacher.source).unet.parameters())
    if spec.student.lora_rank is None:  # full: θ's weights, gradients and AdamW's two moments
        assert state >= 3 * weights
    else:  # LoRA: the adapters only
        assert state < weights


# ---- addctl run end to end: embedded default, a flow teacher ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_addctl_run_with_a_tiny_flow_teacher_end_to_end(recipe, teachers, shards, tmp_path, monkeypatch, ray_cluster):
    """``addctl run`` on the embedded default (local Ray, MLflow store under ADD_HOME): the Ray Train
    loop, the export, an evaluation whose teacher row is the flow teacher's Euler, the registered model."""
    from click.testing import CliRunner

    from orchestrator.cli import main
    from tests.mlflow_server import TINY_CAPTIONS

    monkeypatch.setenv("ADD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    family, name = RECIPES[recipe], f"{recipe}-e2e"
    overrides = tiny_overrides(family, teachers[family], shards, tmp_path / "runs")
    job = yaml.safe_load((ROOT / "jobs" / f"{recipe}.yaml").read_text())
    job["tracking"] = {"experiment": name, "model_name": name}  # the embedded store: no uri
    job["eval"] = {
        "prompts": TINY_CAPTIONS[:2],
        "images_per_prompt": 2,
        "student_steps": 1,
        "teacher_steps": 3,
        "guidance_scale": 2.0 if family == "sd3" else 1.0,  # guidance-distilled FLUX: no CFG
        "speed_batch_size": 2,
        "speed_repeats": 3,
        "speed_warmup": 0,
        "features": "tests.mlflow_server:TinyFeatures",
        "scorer": "tests.mlflow_server:brightness",
    }  # no teacher_solver: the flow teacher's own, Euler
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    args = ["run", str(path)]
    for item in overrides:
        args += ["--set", item]
    started = time.monotonic()
    out = CliRunner().invoke(main, args, catch_exceptions=False)
    TIMINGS[f"addctl run {recipe}"] = time.monotonic() - started
    assert out.exit_code == 0, out.output[-4000:]

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    version = client.get_model_version_by_alias(name, "candidate")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["eval.teacher"].startswith("euler 3 steps")
    assert "eval.error" not in run.data.tags
    assert {"eval/student_fid", "eval/teacher_fid", "eval/speedup"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(version.run_id, "loss/student")] == [1, 2]
