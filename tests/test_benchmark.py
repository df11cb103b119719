"""The benchmark protocol: FID, class accuracy and recall in the classifier's feature space, the
table of sampler rows, shipped teacher rows, and the same table for SD-class jobs with small
feature extractors injected in place of Inception and CLIP."""

import json

import numpy as np
import pytest
import torch

from workers.eval.frechet import FeatureStats, frechet_distance
from workers.eval.manifold import precision_recall

FASHION = "/usr/share/datasets/fashion-mnist"


def _have_fashion_mnist() -> bool:
    from pathlib import Path

    return Path(FASHION, "t10k-images-idx3-ubyte.gz").exists()


needs_fashion = pytest.mark.skipif(not _have_fashion_mnist(), reason="apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def test_split():
    from workers.benchmark.classifier import load_split

    x, y = load_split(FASHION, "test")
    return (x + 1) / 2, y  # images in [0, 1]


def _blur(images, k):
    kernel = torch.ones(1, 1, k, k) / (k * k)
    return torch.nn.functional.conv2d(images, kernel, padding=k // 2)


@needs_fashion
def test_fid_is_zero_for_identical_sets_grows_with_blur_and_noise_and_is_symmetric(test_split):
    from workers.benchmark.evaluator import ClassifierFeatures

    images = test_split[0][:2000]
    features = ClassifierFeatures()
    stats = FeatureStats.of(features(images))
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-6)

    blurred = [frechet_distance(stats, FeatureStats.of(features(_blur(images, k)))) for k in (3, 5, 7)]
    assert 0 < blurred[0] < blurred[1] < blurred[2]
    g = torch.Generator().manual_seed(0)
    noisy = [(images + s * torch.randn(images.shape, generator=g)).clamp(0, 1) for s in (0.05, 0.15, 0.3)]
    noised = [frechet_distance(stats, FeatureStats.of(features(x))) for x in noisy]
    assert 0 < noised[0] < noised[1] < noised[2]

    other = FeatureStats.of(features(_blur(images, 3)))
    assert frechet_distance(stats, other) == pytest.approx(frechet_distance(other, stats), rel=1e-6)


@needs_fashion
def test_class_accuracy_of_the_test_set_is_the_classifiers_test_accuracy(test_split):
    from pathlib import Path

    from workers.benchmark.evaluator import SHIPPED, ClassAccuracy
    from workers.data.fashion_mnist import caption_for, eval_caption_templates

    images, labels = test_split
    prompts = [caption_for(int(y), eval_caption_templates[i % 3]) for i, y in enumerate(labels)]
    accuracy = float(ClassAccuracy()(images, prompts).mean())
    shipped = json.loads(Path(SHIPPED, "classifier.json").read_text())["test_accuracy"]
    assert accuracy == pytest.approx(shipped, abs=1e-6)


def test_prompts_name_their_class_and_a_prompt_without_one_is_an_error():
    from workers.benchmark.evaluator import prompt_label

    assert prompt_label("a low resolution photo of a t-shirt") == 0
    assert prompt_label("a monochrome snapshot of a shirt") == 6
    assert prompt_label("a catalogue image showing an ankle boot") == 9
    assert prompt_label("a pair of trousers") == 1
    with pytest.raises(ValueError, match="names no Fashion-MNIST class"):
        prompt_label("a photo of a cat")


def test_recall_falls_when_the_generated_set_collapses_and_precision_when_it_drifts():
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.normal(size=(600, 8)))
    same = precision_recall(real, torch.from_numpy(rng.normal(size=(600, 8))))
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    collapsed = torch.from_numpy(rng.normal(size=(600, 8)) * 0.1)  # every sample near the mode
    dropped = precision_recall(real, collapsed)
    assert dropped["precision"] > 0.8 and dropped["recall"] < 0.3
    drifted = precision_recall(real, torch.from_numpy(rng.normal(size=(600, 8)) + 4.0))
    assert drifted["precision"] < 0.1
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}


def test_samplers_parse_and_count_network_evaluations():
    from workers.eval.samplers import Sampler

    assert Sampler.parse("ddim:50", 3.0).nfe == 100
    assert Sampler.parse("dpmpp:8", 1.0).nfe == 8
    assert Sampler.parse("student:4").nfe == 4 and Sampler.parse("student:4").family == "ADD student"
    assert Sampler.parse("dpmpp:8", 3.0).family == "teacher DPM-Solver++ + CFG"
    assert Sampler.parse("euler:28", 1.0).family == "teacher Euler"  # a flow teacher's
    assert Sampler.parse("flow-dpmpp:8", 3.0).family == "teacher flow DPM-Solver++ + CFG"
    with pytest.raises(ValueError, match="ddim:STEPS.*euler:STEPS"):
        Sampler.parse("heun:8")


class _TinyFeatures:
    """A fixed random conv net in place of Inception (or the classifier)."""

    def __init__(self, channels):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(),
        ).requires_grad_(False)
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return self.net(images)


class _TinyScorer:
    """A stand-in for CLIP score: the mean brightness, a deterministic score per image."""

    def __call__(self, images, prompts):
        assert len(images) == len(prompts)
        return images.mean(dim=(1, 2, 3)) * 100


def _table_config(teacher_rows=None, num_images=16, generation_batch_size=None):
    """The eval section of a small table (what a job's ``eval`` with ``table`` holds)."""
    from workers.eval.config import EvalSpec, TableSpec

    table = TableSpec(
        num_images=num_images,
        batch_size=4,
        generation_batch_size=generation_batch_size,
        teacher_samplers=["ddim:4", "ddim:1", "dpmpp:2"],
        student_steps=[1, 2],
        reference_sampler="ddim:4",
        teacher_rows=teacher_rows,
        alignment_name="CLIP score",
        reference_uri="tiny-reference",
    )
    return EvalSpec(
        prompts=["a red cube", "a blue sphere"],
        guidance_scale=2.0,
        seed=0,
        teacher_steps=4,
        features="tests.tiny:features",
        scorer="tests.tiny:scorer",
        table=table,
    )


@pytest.fixture(scope="module")
def sd_student(tmp_path_factory):
    """A tiny Stable-Diffusion pipeline folder and its (untrained) exported 2-step student."""
    from tests.tiny_models import save_tiny_sd
    from workers.add.components import load_teacher
    from workers.add.export import export_student
    from workers.add.student import Student, student_timesteps

    folder = tmp_path_factory.mktemp("sd-table")
    source = save_tiny_sd(folder / "teacher")
    teacher = load_teacher(str(source))
    return source, export_student(Student(teacher, timesteps=student_timesteps(2)), teacher, folder / "student")


def test_sd_class_table_with_injected_extractors_measures_every_row_and_writes_its_files(sd_student, tmp_path):
    from workers.eval.table import TableEvaluator, protocol_key, save_teacher_rows, teacher_fingerprint

    source, student_dir = sd_student
    torch.manual_seed(1)
    reference = torch.rand(24, 3, 32, 32)
    evaluator = TableEvaluator(_table_config(), _TinyFeatures(3), _TinyScorer(), reference)
    result = evaluator.evaluate_paths(student_dir, source)

    keys = [r.sampler.key for r in result.rows]
    assert keys == ["teacher-ddim-4", "teacher-ddim-1", "teacher-dpmpp-2", "student-add-1", "student-add-2"]
    for row in result.rows:
        assert row.num_images == 16 and np.isfinite(row.fid) and row.fid > 0
        assert 0 <= row.recall <= 1 and 0 <= row.precision <= 1 and row.ms_per_image > 0
        assert row.timing["repeats"] >= 3
    nfe = {r.sampler.key: r.sampler.nfe for r in result.rows}
    assert nfe["teacher-ddim-4"] == 8 and nfe["student-add-2"] == 2
    m = result.metrics
    assert m["fid_ratio"] == pytest.approx(m["student_fid"] / m["teacher_fid"])
    assert m["speedup"] == pytest.approx(m["teacher_ms_per_image"] / m["student_ms_per_image"])
    assert m["speedup"] > 1  # one student call against eight guided teacher calls

    written = result.write(tmp_path / "results")
    assert {p.name for p in written.iterdir()} == {"table.md", "table.json", "samples.png", "fid_vs_nfe.png"}
    table = (written / "table.md").read_text()
    assert "CLIP score" in table and "| ADD student | 1 | 1 |" in table and "| teacher DDIM + CFG | 4 | 8 |" in table
    body = json.loads((written / "table.json").read_text())
    assert len(body["rows"]) == 5 and body["metrics"]["student_fid"] == pytest.approx(m["student_fid"])

    # shipped teacher rows are read instead of sampled, and refused when the teacher or protocol changed
    shipped = tmp_path / "teacher_rows.json"
    save_teacher_rows(shipped, result.rows[:3], teacher_fingerprint(source), protocol_key(_table_config()))
    features = _TinyFeatures(3)
    reused = TableEvaluator(_table_config(str(shipped)), features, _TinyScorer(), reference)
    again = reused.evaluate_paths(student_dir, source)
    assert [r.fid for r in again.rows[:3]] == [r.fid for r in result.rows[:3]]
    assert [r.fid for r in again.rows[3:]] == pytest.approx([r.fid for r in result.rows[3:]])

    from workers.eval.table import StaleTeacherRows

    with pytest.raises(StaleTeacherRows, match="num_images differ"):
        TableEvaluator(_table_config(str(shipped), num_images=20), features, None, reference).evaluate_paths(
            student_dir, source
        )
    (source / "unet" / "config.json").write_text((source / "unet" / "config.json").read_text() + "\n")
    with pytest.raises(StaleTeacherRows, match="another teacher"):
        reused.evaluate_paths(student_dir, source)


def test_a_killed_row_measurement_resumes_from_its_kept_batches_and_gives_the_uninterrupted_row(tmp_path):
    from workers.eval.progress import RowProgress, StaleProgress
    from workers.eval.protocol import Protocol
    from workers.eval.samplers import Sampler

    config = _table_config(num_images=18)  # batches of 4: four full ones and a short one
    torch.manual_seed(2)
    protocol = Protocol(config, _TinyFeatures(3), _TinyScorer(), torch.rand(20, 3, 16, 16))
    sampler = Sampler.parse("ddim:4", 2.0)
    calls = []

    def generate(prompts, generator, kill_at=None):
        calls.append(len(prompts))
        if kill_at is not None and len(calls) == kill_at:
            raise KeyboardInterrupt  # the session ends in the middle of the row
        return torch.rand(len(prompts), 3, 16, 16, generator=generator)

    whole = protocol.measure(sampler, generate)
    key = {"teacher_fingerprint": "abc", "num_images": 18}
    progress = RowProgress(tmp_path / "progress", key)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        protocol.measure(sampler, lambda p, g: generate(p, g, kill_at=4), progress)
    images, seconds, state = RowProgress(tmp_path / "progress", key).batches(sampler)
    assert len(images) == 3 and len(seconds) == 3 and state is not None  # three finished batches kept

    calls.clear()
    resumed = protocol.measure(sampler, generate, RowProgress(tmp_path / "progress", key))
    assert calls[:2] == [4, 2]  # only the last full batch and the short one were generated again
    assert resumed.fid == pytest.approx(whole.fid) and resumed.recall == whole.recall
    assert resumed.alignment == pytest.approx(whole.alignment) and resumed.num_images == 18

    calls.clear()  # a finished row is read back, not measured
    again = protocol.measure(sampler, generate, RowProgress(tmp_path / "progress", key))
    assert calls == [] and again.fid == pytest.approx(whole.fid)
    assert not (tmp_path / "progress" / "batches" / sampler.key).exists()  # its batches are dropped

    with pytest.raises(StaleProgress, match="num_images"):
        RowProgress(tmp_path / "progress", key | {"num_images": 20})


def test_generation_at_another_batch_size_is_timed_at_the_protocols():
    """table.generation_batch_size: images are generated in calls of that size (a CPU's fastest), and
    the speed columns still come from warmed-up calls at batch_size."""
    from workers.eval.protocol import Protocol
    from workers.eval.samplers import Sampler

    config = _table_config(num_images=18, generation_batch_size=6)
    protocol = Protocol(config, _TinyFeatures(3), _TinyScorer(), torch.rand(20, 3, 16, 16))
    calls = []

    def generate(prompts, generator):
        calls.append(len(prompts))
        return torch.rand(len(prompts), 3, 16, 16, generator=generator)

    row = protocol.measure(Sampler.parse("ddim:4", 2.0), generate)
    assert calls == [6, 6, 6] + [4] * 4  # the row in calls of 6; a warm-up and 3 timed calls of 4
    assert row.num_images == 18 and row.timing["batch_size"] == 4 and row.timing["repeats"] == 3

    calls.clear()  # without it, the generation's own batches of 4 are timed: no extra calls
    Protocol(_table_config(num_images=18), _TinyFeatures(3), None, torch.rand(20, 3, 16, 16)).measure(
        Sampler.parse("ddim:4", 2.0), generate
    )
    assert calls == [4, 4, 4, 4, 2]
