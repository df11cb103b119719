"""The ADD step on tiny SD-style teachers: who gets gradients from which loss."""

import pytest
import torch

from tests.tiny_models import PIXEL_SIZE, save_tiny_pixel_unet, save_tiny_sd, tiny_dinov2
from workers.add.balance import Balance
from workers.add.components import load_teacher
from workers.add.discriminator import build_discriminator
from workers.add.losses import DistillationLoss, R1Penalty
from workers.add.step import (
    ADDBatch,
    ADDModels,
    ADDObjective,
    Update,
    discriminator_backward,
    discriminator_step,
    student_backward,
    student_loss,
    student_sample,
    student_step,
)
from workers.add.student import Student

B = 2


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory):
    return load_teacher(str(save_tiny_sd(tmp_path_factory.mktemp("sd") / "teacher")))


def make(teacher, backbone="dinov2", lora_rank=None, image_conditioning=False, mix_real_fake=False):
    student = Student(teacher, lora_rank=lora_rank)
    if backbone == "dinov2":
        D = build_discriminator(
            "dinov2",
            cond_dim=teacher.prompt_encoder.pooled_dim,
            dinov2=tiny_dinov2(),
            resolution=32,
            image_conditioning=image_conditioning,
            mix_real_fake=mix_real_fake,
        )
    else:
        D = build_discriminator(
            "teacher", cond_dim=teacher.prompt_encoder.pooled_dim, teacher=teacher, mix_real_fake=mix_real_fake
        )
    models = ADDModels(student, teacher, D)
    opt_g = torch.optim.SGD(student.trainable_parameters(), lr=0.0)  # lr 0: inspect gradients, keep weights
    opt_d = torch.optim.SGD(D.trainable_parameters(), lr=0.0)
    return models, opt_g, opt_d


def batch_for(teacher):
    pixels = torch.rand(B, 3, PIXEL_SIZE, PIXEL_SIZE) * 2 - 1
    return ADDBatch.from_pixels(teacher, pixels, teacher.encode_prompts(["a photo of a sneaker", "a dress"]))


def frozen_parameters(models):
    teacher, D = models.teacher, models.discriminator
    parts = {
        "teacher unet": teacher.unet,
        "text encoder": teacher.prompt_encoder,
        "vae": teacher.codec,
        "feature network": D.feature_network,
    }
    return {name: list(module.parameters()) for name, module in parts.items()}


def has_grad(params):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("backbone", ["dinov2", "teacher"])
@pytest.mark.parametrize(
    "weights",
    [{}, {"lambda_distill": 0.0}, {"balance": Balance(lambda_adv=0.0)}, {"balance": Balance("adaptive", ratio=0.5)}],
    ids=["both", "adversarial only", "distill only", "adaptive balance"],
)
def test_student_step_gradients(sd_teacher, backbone, weights):
    models, opt_g, _ = make(sd_teacher, backbone)
    objective = ADDObjective(**weights)
    metrics, fake = student_step(
        models, objective, batch_for(sd_teacher), opt_g, torch.Generator().manual_seed(0)
    )
    # each loss alone reaches θ: the student's output is not detached on either path
    assert has_grad(models.student.trainable_parameters())
    for name, params in frozen_parameters(models).items():
        assert all(p.grad is None for p in params), f"{name} got gradients"
        assert all(not p.requires_grad for p in params), f"{name} is trainable"
    assert not has_grad(models.discriminator.trainable_parameters()), "L_G must not update the heads"
    assert not fake.requires_grad
    assert {"loss/G_adv", "loss/distill", "grad_norm/student", "logits/fake_G"} <= metrics.keys()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


@pytest.mark.parametrize("backbone", ["dinov2", "teacher"])
def test_mixed_batch_norm_groups_route_gradients_the_same_way(sd_teacher, backbone):
    """discriminator.mix_real_fake: L_G sees the real batch beside the fake one, yet θ alone gets gradients;
    the heads' update then learns from both halves."""
    models, opt_g, opt_d = make(sd_teacher, backbone, mix_real_fake=True)
    batch = batch_for(sd_teacher)
    _, fake = student_step(models, ADDObjective(), batch, opt_g, torch.Generator().manual_seed(0), measure=True)
    assert has_grad(models.student.trainable_parameters())
    for name, params in frozen_parameters(models).items():
        assert all(p.grad is None for p in params), f"{name} got gradients"
    assert not has_grad(models.discriminator.trainable_parameters())
    metrics = discriminator_step(models, ADDObjective(), batch, fake, opt_d, step=0)
    assert has_grad(models.discriminator.trainable_parameters())
    assert {"heads/auc_mean", "heads/0/auc"} <= metrics.keys()


def test_adversarial_gradient_is_the_discriminators(sd_teacher):
    """With only L_G, the student's gradient changes when the heads change: it flows through D."""
    models, opt_g, _ = make(sd_teacher)
    batch = batch_for(sd_teacher)
    grads = []
    for _ in range(2):
        student_step(models, ADDObjective(lambda_distill=0.0), batch, opt_g, torch.Generator().manual_seed(0))
        grads.append(torch.cat([p.grad.flatten() for p in models.student.trainable_parameters()]))
        with torch.no_grad():
            for p in models.discriminator.trainable_parameters():
                p.mul_(-1)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("backbone", ["dinov2", "teacher"])
def test_discriminator_step_updates_heads_only(sd_teacher, backbone):
    models, opt_g, opt_d = make(sd_teacher, backbone, image_conditioning=backbone == "dinov2")
    batch = batch_for(sd_teacher)
    g = torch.Generator().manual_seed(0)
    _, fake = student_step(models, ADDObjective(), batch, opt_g, g)
    models.student.zero_grad(set_to_none=True)
    objective = ADDObjective(r1=R1Penalty(gamma=1.0))
    metrics = discriminator_step(models, objective, batch, fake, opt_d, step=0, generator=g)
    assert has_grad(models.discriminator.trainable_parameters())
    assert all(p.grad is None for p in models.student.parameters())
    for name, params in frozen_parameters(models).items():
        assert all(p.grad is None for p in params), f"{name} got gradients"
    assert metrics["loss/R1"] > 0
    assert {
        "loss/D_real",
        "loss/D_fake",
        "logits/real",
        "logits/fake",
        "grad_norm/discriminator",
    } <= metrics.keys()


@pytest.mark.parametrize("backbone", ["dinov2", "teacher"])
def test_an_extra_heads_update_sees_the_students_own_sample(sd_teacher, backbone):
    """student_sample draws sg(x̂θ) as the student's step does (same generator, same fake), without
    a graph, in D's input space (decoded pixels for DINOv2, latents for the teacher's encoder)."""
    models, _, opt_d = make(sd_teacher, backbone)
    batch = batch_for(sd_teacher)
    fake = student_sample(models, batch, torch.Generator().manual_seed(3))
    _, _, fake_of_step = student_loss(models, ADDObjective(), batch, torch.Generator().manual_seed(3))
    assert not fake.requires_grad and fake.grad_fn is None
    torch.testing.assert_close(fake, fake_of_step)
    space = batch.pixels if backbone == "dinov2" else batch.x0
    assert fake.shape == space.shape
    assert not torch.equal(fake, student_sample(models, batch, torch.Generator().manual_seed(4)))
    discriminator_step(models, ADDObjective(), batch, fake, opt_d, step=0)
    assert has_grad(models.discriminator.trainable_parameters())
    assert all(p.grad is None for p in models.student.parameters())


def test_lora_student_trains_adapters_only(sd_teacher):
    models, opt_g, _ = make(sd_teacher, "teacher", lora_rank=4)
    trainable = dict(models.student.named_parameters())
    names = [n for n, p in trainable.items() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    student_step(models, ADDObjective(), batch_for(sd_teacher), opt_g)
    assert has_grad(models.student.trainable_parameters())
    assert all(p.grad is None for n, p in trainable.items() if "lora" not in n)


@pytest.mark.parametrize("weighting", ["exponential", "sds", "nfsd"])
def test_pixel_teacher_step_runs_for_each_weighting(tmp_path, weighting):
    teacher = load_teacher(str(save_tiny_pixel_unet(tmp_path / "t", conditioning="class")))
    models, opt_g, opt_d = make(teacher, "teacher")
    pixels = torch.rand(B, 3, PIXEL_SIZE, PIXEL_SIZE) * 2 - 1
    batch = ADDBatch.from_pixels(teacher, pixels, teacher.encode_prompts([1, 7]))
    objective = ADDObjective(distill=DistillationLoss(weighting))
    metrics, fake = student_step(models, objective, batch, opt_g)
    metrics |= discriminator_step(models, objective, batch, fake, opt_d, 0)
    assert metrics["loss/distill"] > 0 and has_grad(models.student.trainable_parameters())


def test_non_finite_loss_fails_with_the_values(sd_teacher):
    models, opt_g, _ = make(sd_teacher, "teacher")
    batch = batch_for(sd_teacher)
    batch.x0[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite student loss"):
        student_step(models, ADDObjective(), batch, opt_g)


def test_both_updates_clip_to_the_objectives_max_grad_norm(sd_teacher):
    """``ADDObjective.max_grad_norm`` clips θ and φ alike (the loop builds it from train.max_grad_norm)."""
    models, _, _ = make(sd_teacher, "teacher")
    theta, heads = models.student.trainable_parameters(), models.discriminator.trainable_parameters()
    opt_g, opt_d = torch.optim.SGD(theta, lr=1.0), torch.optim.SGD(heads, lr=1.0)  # the step is the gradient
    objective, batch = ADDObjective(max_grad_norm=1e-4), batch_for(sd_teacher)
    before = [p.detach().clone() for p in theta + heads]
    metrics, fake = student_step(models, objective, batch, opt_g, torch.Generator().manual_seed(0))
    metrics |= discriminator_step(models, objective, batch, fake, opt_d, 0, torch.Generator().manual_seed(0))
    moved = [p.detach() - b for p, b in zip(theta + heads, before, strict=True)]
    for name, part in (("student", moved[: len(theta)]), ("discriminator", moved[len(theta) :])):
        assert metrics[f"grad_norm/{name}"] > 1e-4  # measured before clipping
        assert torch.linalg.vector_norm(torch.stack([m.norm() for m in part])) == pytest.approx(1e-4, rel=1e-3)


def test_micro_batches_accumulate_into_one_update_and_the_heads_stay_out_of_the_students(sd_teacher):
    """What the training loop runs per micro-batch: each backward scaled by 1/micro_batches, the heads
    frozen during the student's, nothing stepped until ``step()``."""
    models, opt_g, opt_d = make(sd_teacher, "teacher")
    theta = Update(models.student.trainable_parameters(), opt_g, micro_batches=2)
    heads = Update(models.discriminator.trainable_parameters(), opt_d, micro_batches=2)
    theta.zero_grad()
    heads.zero_grad()
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        _, fake = student_backward(models, ADDObjective(), batch_for(sd_teacher), theta, g)
        assert (i == 0) == (not has_grad(heads.params))  # the first student backward left the heads alone
        discriminator_backward(models, ADDObjective(), batch_for(sd_teacher), fake, heads, 0, g)
    assert has_grad(theta.params) and has_grad(heads.params)
    assert all(p.requires_grad for p in heads.params)  # unfrozen again
    assert float(theta.clip()) > 0 and float(heads.clip()) > 0


def test_unknown_distill_space_is_named():
    with pytest.raises(ValueError, match="unknown distill_space 'rgb'.*pixel, latent"):
        ADDObjective(distill_space="rgb")
