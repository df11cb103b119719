"""The benchmark's own models: the teacher's plain diffusion training and the evaluator classifier."""

import torch

from tests.test_data import tiny_fashion_mnist
from workers.add.components import load_teacher
from workers.benchmark.classifier import FashionClassifier, load_classifier
from workers.benchmark.classifier import train as train_classifier
from workers.diffusion.train import export, train


def test_teacher_training_resumes_exactly_and_exports_a_loadable_teacher(tmp_path):
    (tmp_path / "idx").mkdir()
    tiny_fashion_mnist(tmp_path / "idx")
    kwargs = dict(batch_size=4, checkpoint_every=2, idx_dir=str(tmp_path / "idx"), bf16=False, warmup=2)
    train(tmp_path / "straight", steps=4, **kwargs)
    train(tmp_path / "resumed", steps=2, **kwargs)
    train(tmp_path / "resumed", steps=4, **kwargs)  # picks up the step-2 checkpoint
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == straight["step"] == 4
    for name, value in straight["ema"].items():
        torch.testing.assert_close(resumed["ema"][name], value, rtol=0, atol=0)

    folder = export(tmp_path / "straight", tmp_path / "teacher")
    teacher = load_teacher(str(folder))  # the text encoder comes from the installed package
    cond = teacher.encode_prompts(["a photo of a sneaker", "a bag"])
    x0 = teacher.denoise(torch.randn(2, 1, 32, 32), torch.tensor([500, 500]), cond, guidance_scale=3.0)
    assert x0.shape == (2, 1, 32, 32) and torch.isfinite(x0).all()
    assert teacher.schedule.prediction_type == "v_prediction"


def test_classifier_trains_saves_and_loads(tmp_path):
    (tmp_path / "idx").mkdir()
    tiny_fashion_mnist(tmp_path / "idx", n_train=64, n_test=20)
    info = train_classifier(tmp_path / "clf", epochs=1, batch_size=16, idx_dir=str(tmp_path / "idx"))
    assert 0.0 <= info["test_accuracy"] <= 1.0
    model = load_classifier(tmp_path / "clf")
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert model.features(x).shape == (3, FashionClassifier.feature_dim)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    try:
        load_classifier(tmp_path / "nowhere")
    except FileNotFoundError as err:
        assert "no evaluator classifier" in str(err)
    else:
        raise AssertionError("a missing classifier must be a clear error")


def test_the_shipped_classifier_is_the_one_its_info_describes():
    import json
    from pathlib import Path

    folder = Path(__file__).parents[1] / "jobs" / "fashion-mnist" / "evaluator"
    info = json.loads((folder / "classifier.json").read_text())
    assert info["test_accuracy"] >= 0.90
    model = load_classifier(folder)
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
