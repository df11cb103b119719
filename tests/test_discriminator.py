"""The discriminator: frozen F (DINOv2 or the teacher), trainable heads, augmentation, R1 at the heads."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import Dinov2Config, Dinov2Model

from workers.add.augment import DiffAugment
from workers.add.conditioning import Conditioning
from workers.add.discriminator import build_discriminator
from workers.add.features import DinoV2Features, TeacherFeatures, default_dinov2_taps
from workers.add.heads import BatchNormLocal, DiscriminatorHead
from workers.add.teacher import Teacher

B, POOLED, TEXT_DIM = 4, 8, 16
SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
}


def tiny_dinov2(num_layers: int = 4, hidden: int = 32) -> Dinov2Model:
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        patch_size=4,
        image_size=32,
    )
    return Dinov2Model(config)


def tiny_teacher() -> Teacher:
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return Teacher(unet, SCHEDULER)


def conditioning(pooled: bool = True) -> Conditioning:
    return Conditioning(
        prompt_embeds=torch.randn(B, 3, TEXT_DIM), pooled=torch.randn(B, POOLED) if pooled else None
    )


def build(backbone: str, **kwargs):
    """(D, x): a tiny discriminator of the backbone and an input in its space."""
    if backbone == "dinov2":
        D = build_discriminator("dinov2", dinov2=tiny_dinov2(), resolution=32, cond_dim=POOLED, **kwargs)
        return D, torch.rand(B, 3, 32, 32) * 2 - 1
    D = build_discriminator("teacher", teacher=tiny_teacher(), cond_dim=POOLED, **kwargs)
    return D, torch.randn(B, 4, 8, 8)


def frozen_parameters(D):
    F = D.feature_network
    return list(F.teacher.parameters()) if isinstance(F, TeacherFeatures) else list(F.parameters())


# --- augmentation -----------------------------------------------------------------------------


def test_diffaugment_is_seeded_differentiable_and_keeps_shape():
    aug = DiffAugment("color,translation,cutout")
    x = torch.randn(B, 3, 16, 12, requires_grad=True)
    y1 = aug(x, torch.Generator().manual_seed(1))
    y2 = aug(x, torch.Generator().manual_seed(1))
    y3 = aug(x, torch.Generator().manual_seed(2))
    assert y1.shape == x.shape
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    y1.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(DiffAugment("")(x), x)


def test_diffaugment_rejects_unknown_policy():
    with pytest.raises(
        ValueError, match="unknown augmentation 'flip': allowed are color, translation, cutout"
    ):
        DiffAugment("color,flip")


# --- heads ------------------------------------------------------------------------------------


def test_batchnorm_local_normalises_each_virtual_batch_alone():
    bn = BatchNormLocal(5, virtual_bs=2)
    x = torch.randn(5, 5, 7)  # groups of 2, 2 and 1 sample
    y = bn(x)
    x2 = x.clone()
    x2[2:] = torch.randn(3, 5, 7)
    assert torch.equal(bn(x2)[:2], y[:2])
    assert torch.allclose(y[:2].mean(dim=(0, 2)), torch.zeros(5), atol=1e-5)


def test_head_shapes_for_tokens_and_grids_conditional_and_not():
    tokens, grid, c = torch.randn(B, 6, 10), torch.randn(B, 6, 3, 5), torch.randn(B, 7)
    assert DiscriminatorHead(6, c_dim=7, spatial_dims=1)(tokens, c).shape == (B, 10)
    assert DiscriminatorHead(6, c_dim=7, spatial_dims=2)(grid, c).shape == (B, 15)
    assert DiscriminatorHead(6, c_dim=0, spatial_dims=1)(tokens).shape == (B, 10)
    with pytest.raises(ValueError, match="conditional"):
        DiscriminatorHead(6, c_dim=7)(tokens, None)


# --- feature networks -------------------------------------------------------------------------


def test_dinov2_default_taps_are_the_embedding_and_blocks_spread_evenly():
    assert default_dinov2_taps(12) == [0, 3, 6, 9, 12]  # embeddings + blocks 2, 5, 8, 11 zero-based
    assert default_dinov2_taps(4) == [0, 1, 2, 3, 4]
    F = DinoV2Features(tiny_dinov2(num_layers=12, hidden=8), resolution=32)
    assert F.taps == [0, 3, 6, 9, 12] and F.channels == [8] * 5


def test_dinov2_features_are_patch_tokens_and_accept_grayscale():
    F = DinoV2Features(tiny_dinov2(), taps=[0, 4], resolution=16)
    feats, c_extra = F(torch.rand(B, 1, 40, 40) * 2 - 1)  # grayscale, resized to 16: 4x4 patches
    assert [f.shape for f in feats] == [(B, 32, 16)] * 2 and c_extra is None


def test_image_smaller_than_patch_is_rejected():
    F = DinoV2Features(tiny_dinov2(), resolution=None)
    with pytest.raises(ValueError, match="image 2x2 is smaller than the DINOv2 patch size 4"):
        F(torch.zeros(1, 3, 2, 2))


def test_teacher_features_leave_no_hooks_and_are_seeded():
    teacher = tiny_teacher()
    F = TeacherFeatures(teacher)
    assert F.taps == ["down_blocks.0", "down_blocks.1", "mid_block"] and F.channels == [32, 64, 64]
    x, cond = torch.randn(B, 4, 8, 8), conditioning()
    feats, c_extra = F(x, cond, torch.Generator().manual_seed(3))
    again, _ = F(x, cond, torch.Generator().manual_seed(3))
    assert [f.shape for f in feats] == [(B, 32, 4, 4), (B, 64, 4, 4), (B, 64, 4, 4)]
    assert c_extra.shape == (B, 64)
    assert all(torch.equal(a, b) for a, b in zip(feats, again, strict=True))
    assert all(not m._forward_hooks for m in teacher.modules())
    # The teacher is shared, not owned: no second copy in the discriminator's state.
    assert not list(F.state_dict()) and F.teacher is teacher


def test_teacher_t_hat_is_logit_normal_over_the_timesteps():
    F = TeacherFeatures(tiny_teacher(), t_hat_loc=0.0, t_hat_scale=1.0)
    t_hat = F.sample_t_hat(4000, torch.Generator().manual_seed(0))
    assert t_hat.dtype == torch.long and 0 <= t_hat.min() and t_hat.max() <= 999
    assert abs(t_hat.float().median().item() - 499.5) < 25  # sigmoid(N(0, 1)) has median 1/2
    low = TeacherFeatures(tiny_teacher(), t_hat_loc=-2.0).sample_t_hat(4000, torch.Generator().manual_seed(0))
    assert abs(low.float().median().item() - 999 * torch.sigmoid(torch.tensor(-2.0)).item()) < 10


# --- the discriminator ------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["dinov2", "teacher"])
def test_only_heads_train_and_the_feature_network_stays_frozen(backbone):
    D, x = build(backbone)
    D.train()
    assert not D.feature_network.training and not any(m.training for m in D.feature_network.modules())
    logits = D(x, conditioning())
    expected = [(B, 64)] * 5 if backbone == "dinov2" else [(B, 16)] * 3
    assert [tuple(logit.shape) for logit in logits] == expected
    sum(logit.mean() for logit in logits).backward()
    trainable = D.trainable_parameters()
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(not p.requires_grad and p.grad is None for p in frozen_parameters(D))
    assert {id(p) for p in trainable} == {id(p) for p in D.parameters() if p.requires_grad}


@pytest.mark.parametrize("backbone", ["dinov2", "teacher"])
def test_gradient_reaches_the_fake_input_through_F(backbone):
    D, x = build(backbone)
    x_fake = x.requires_grad_(True)
    L_G = -sum(logit.mean() for logit in D(x_fake, conditioning()))
    L_G.backward()
    assert x_fake.grad is not None and x_fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen_parameters(D))


@pytest.mark.parametrize("backbone", ["dinov2", "teacher"])
def test_r1_at_the_heads_input(backbone):
    D, x0 = build(backbone)
    cond = conditioning()
    with torch.no_grad():
        feats, c = D.features(x0, cond)
    feats = [f.detach().requires_grad_(True) for f in feats]
    real_logits = D.head_logits(feats, c)
    grads = torch.autograd.grad(sum(logit.sum() for logit in real_logits), feats, create_graph=True)
    r1 = sum(g.square().flatten(1).sum(1) for g in grads)  # per sample
    assert r1.shape == (B,) and (r1 > 0).all()
    D(x0, cond)  # another forward before backward: spectral norm must not break the graph
    r1.mean().backward()
    # Weights get an R1 gradient; some biases cannot (the input gradient does not depend on them).
    assert all(p.grad is not None for p in D.trainable_parameters() if p.ndim > 1)


def test_image_conditioning_uses_the_real_image_and_needs_it():
    D, x = build("dinov2", image_conditioning=True, augment_policy="")
    D.eval()  # spectral norm's power iteration would otherwise change the weights between calls
    cond, x_real = conditioning(), torch.rand(B, 3, 32, 32) * 2 - 1
    assert D.c_dim == POOLED + 32
    a = D(x, cond, x_real=x_real)
    b = D(x, cond, x_real=-x_real)
    assert any(not torch.allclose(p, q) for p, q in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="needs x_real"):
        D(x, cond)


def test_text_condition_is_rescaled_to_unit_rms_and_a_null_one_stays_zero():
    D, _ = build("dinov2")
    unit = torch.nn.functional.normalize(torch.randn(B, POOLED), dim=1)  # a sentence encoder's pooled
    unit[0] = 0  # the null caption of an SDXL-style encoder
    c = D.condition(Conditioning(pooled=unit), None, None)
    assert torch.allclose(c[1:].square().mean(dim=1), torch.ones(B - 1), atol=1e-5)
    assert torch.equal(c[0], torch.zeros(POOLED))
    assert torch.allclose(c[1:] / c[1:].norm(dim=1, keepdim=True), unit[1:], atol=1e-6)  # direction kept
    D, _ = build("dinov2", text_rms=False)
    assert torch.equal(D.condition(Conditioning(pooled=unit), None, None), unit)


def test_mixed_batch_norm_groups_hold_real_and_fake_and_separate_ones_do_not():
    """discriminator.mix_real_fake: the real logits then depend on the fake batch (they share each
    group's statistics); separate groups keep them independent, and either way each sample keeps its own
    condition and logits come back in the order given."""
    torch.manual_seed(0)
    cond = conditioning()
    for mix in (False, True):
        D, x = build("dinov2", mix_real_fake=mix)
        D.eval()  # spectral norm's power iteration would move between the calls
        with torch.no_grad():
            feats, c = D.features(x, cond, generator=torch.Generator().manual_seed(0))
            real_a, fake_a = D.paired_logits(feats, [f.flip(0) for f in feats], c, c.flip(0))
            real_b, _ = D.paired_logits(feats, [f.flip(0) + 1 for f in feats], c, c.flip(0))
            alone = D.head_logits(feats, c)
        assert [r.shape for r in real_a] == [f.shape for f in fake_a] == [a.shape for a in alone]
        same = all(torch.allclose(a, b) for a, b in zip(real_a, real_b, strict=True))
        assert same != mix, f"mix_real_fake={mix}"
        if not mix:
            assert all(torch.allclose(a, b) for a, b in zip(real_a, alone, strict=True))


def test_unconditional_discriminators():
    D = build_discriminator("dinov2", dinov2=tiny_dinov2(), resolution=32, cond_dim=0)
    _, c = D.features(torch.zeros(B, 3, 32, 32), Conditioning())
    assert c is None
    assert [logit.shape for logit in D(torch.zeros(B, 3, 32, 32), Conditioning())] == [(B, 64)] * 5
    # The teacher backbone still conditions on its noise level t̂.
    D = build_discriminator("teacher", teacher=tiny_teacher(), cond_dim=0)
    logits = D(torch.randn(B, 4, 8, 8), conditioning(pooled=False))
    assert D.c_dim == 64 and [logit.shape for logit in logits] == [(B, 16)] * 3


def test_augmentation_defaults_per_backbone():
    assert build("dinov2")[0].augment.policy == "color,translation,cutout"
    assert build("teacher")[0].augment.policy == ""
    assert build("teacher", augment_policy="translation")[0].augment.policy == "translation"


def test_errors_name_what_is_wrong():
    with pytest.raises(
        ValueError, match="unknown discriminator backbone 'clip': allowed are dinov2, teacher"
    ):
        build_discriminator("clip", cond_dim=0)
    with pytest.raises(ValueError, match="needs the teacher"):
        build_discriminator("teacher", cond_dim=0)
    with pytest.raises(ValueError, match="has no image embedding"):
        build_discriminator("teacher", teacher=tiny_teacher(), cond_dim=0, image_conditioning=True)
    with pytest.raises(ValueError, match="teacher tap 'nope' names no module"):
        TeacherFeatures(tiny_teacher(), taps=["down_blocks.0", "nope"])
    with pytest.raises(ValueError, match=r"DINOv2 taps \[0, 5\] invalid"):
        DinoV2Features(tiny_dinov2(), taps=[0, 5])
    D, x = build("dinov2")
    with pytest.raises(ValueError, match="pooled of width 8"):
        D(x, conditioning(pooled=False))


def test_dinov2_loads_from_a_saved_folder_and_names_a_missing_one(tmp_path):
    tiny_dinov2().save_pretrained(tmp_path / "dinov2")
    D = build_discriminator("dinov2", cond_dim=POOLED, dinov2=str(tmp_path / "dinov2"), resolution=32)
    logits = D(torch.rand(B, 3, 16, 16) * 2 - 1, conditioning())
    assert len(logits) == 5 and all(torch.isfinite(lg).all() for lg in logits)
    with pytest.raises(FileNotFoundError, match="cannot load the DINOv2 feature network .*nowhere"):
        build_discriminator("dinov2", cond_dim=POOLED, dinov2=str(tmp_path / "nowhere"))


# --- minibatch standard deviation (discriminator.minibatch_std) ----------------------------------


def test_minibatch_std_is_the_spread_within_each_group_of_consecutive_samples():
    from workers.add.heads import MinibatchStd

    copies, spread = torch.ones(4, 3, 5), torch.randn(4, 3, 5)
    out = MinibatchStd(4)(torch.cat([copies, spread]))
    assert out.shape == (8, 4, 5) and torch.equal(out[:, :3], torch.cat([copies, spread]))
    assert torch.allclose(out[:4, 3], torch.full((4, 5), 1e-4))  # √1e-8: a group of copies has no spread
    expected = spread.var(dim=0, unbiased=False).add(1e-8).sqrt().mean()
    assert torch.allclose(out[4:, 3], expected.expand(4, 5))
    assert torch.equal(MinibatchStd(3)(torch.zeros(7, 2, 1))[6:, 2], torch.zeros(1, 1))  # a group of one
    with pytest.raises(ValueError, match="at least 2"):
        MinibatchStd(1)


def test_minibatch_std_lets_the_heads_tell_copies_from_a_diverse_batch_and_pull_near_copies_apart():
    """A head with minibatch_std sees a batch of copies and a diverse batch differently where every sample
    alone is the same; for near-copies its logit's gradient differs from sample to sample by as much as
    its common part (through the group's spread), where a per-sample head's differs by the noise alone."""
    x = torch.randn(1, 8, 6)
    for seed in range(3):
        torch.manual_seed(seed)
        head = DiscriminatorHead(8, 0, spatial_dims=1, minibatch_std=4).eval()
        plain = DiscriminatorHead(8, 0, spatial_dims=1).eval()
        with torch.no_grad():
            assert not torch.allclose(head(x.expand(4, 8, 6))[0], head(torch.cat([x, torch.randn(3, 8, 6)]))[0])
            # without it, the first sample's logit depends on the rest only through batch norm's statistics
            assert torch.allclose(plain(torch.cat([x, x, x, x]))[0], plain(x.expand(4, 8, 6))[0])
        near = x + 1e-3 * torch.randn(4, 8, 6)
        apart = []
        for h in (head, plain):
            xs = near.clone().requires_grad_(True)
            h(xs).sum().backward()
            apart.append(float((xs.grad - xs.grad.mean(0)).norm() / xs.grad.mean(0).norm()))
        assert apart[0] > 0.3 and apart[1] < 0.03, apart  # measured: 0.65–3.4 against 0.003–0.008


def test_minibatch_std_needs_groups_of_one_kind():
    with pytest.raises(ValueError, match="mix_real_fake"):
        build("teacher", mix_real_fake=True, minibatch_std=4)
    D, x = build("teacher", minibatch_std=4)
    assert all(h.mbstd is not None and h.mbstd.group_size == 4 for h in D.heads)
    logits = D(x, conditioning())
    assert all(logit.shape[0] == x.shape[0] for logit in logits)
