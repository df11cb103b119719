"""Flow-matching transformer teachers (SD3, FLUX, Sana) through the family interface: loading, the
pipelines' own encodings and samples, one ADD step with both losses, LADD on the teacher's tokens,
LoRA, FSDP2 on two gloo ranks, and the loader's refusals."""

import json
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from diffusers import AutoencoderDC, DiffusionPipeline, FluxPipeline, SD3Transformer2DModel

from tests.tiny_models import (
    LATENT_SIZE,
    PIXEL_SIZE,
    TEXT_LENGTH,
    save_tiny_flux,
    save_tiny_sana,
    save_tiny_sd3,
    tiny_dinov2,
)
from workers.add.components import load_teacher
from workers.add.discriminator import build_discriminator
from workers.add.families import family_of
from workers.add.schedule import FlowMatchSchedule, dynamic_shift
from workers.add.step import ADDBatch, ADDModels, ADDObjective, discriminator_step, student_step
from workers.add.student import Student

PROMPTS = ["a photo of a sneaker", "a black bag"]
FAMILIES = ["sd3", "flux", "flux_dev", "sana"]
SAVERS = {
    "sd3": save_tiny_sd3,
    "flux": save_tiny_flux,
    "flux_dev": lambda p: save_tiny_flux(p, guidance_embeds=True),
    "sana": save_tiny_sana,
}
B = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: save(root / name) for name, save in SAVERS.items()}


@pytest.fixture(scope="module")
def teachers(folders):
    return {name: load_teacher(folder) for name, folder in folders.items()}


def batch_for(teacher):
    pixels = torch.rand(B, 3, PIXEL_SIZE, PIXEL_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return ADDBatch.from_pixels(teacher, pixels, teacher.encode_prompts(PROMPTS))


def make(teacher, backbone="teacher", lora_rank=None, taps=None):
    student = Student(teacher, lora_rank=lora_rank)
    kwargs = {"dinov2": tiny_dinov2(), "resolution": 32} if backbone == "dinov2" else {"teacher": teacher, "taps": taps}
    D = build_discriminator(backbone, cond_dim=teacher.prompt_encoder.pooled_dim, **kwargs)
    opt_g = torch.optim.SGD(student.trainable_parameters(), lr=0.0)  # lr 0: inspect gradients, keep weights
    opt_d = torch.optim.SGD(D.trainable_parameters(), lr=0.0)
    return ADDModels(student, teacher, D), opt_g, opt_d


def has_grad(params):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


# ---- loading: the family's parts, its schedule, and the pipeline's own encodings and samples ----


@pytest.mark.parametrize("name", FAMILIES)
def test_family_parts(teachers, name):
    teacher = teachers[name]
    family = family_of(teacher.unet)
    assert family.name == name.split("_")[0]
    assert isinstance(teacher.schedule, FlowMatchSchedule) and teacher.schedule.prediction_type == "flow"
    assert teacher.codec.latent_channels == 4 and teacher.codec.downsample_factor == 2
    assert isinstance(teacher.codec.vae, AutoencoderDC) == (name == "sana")
    if name.startswith("flux"):  # the dynamic shift at the packed token count of 16×16 pixels: 4×4 tokens
        assert teacher.image_seq_len == 16
        assert teacher.schedule.shift == pytest.approx(dynamic_shift(teacher.scheduler_config, 16))
    else:  # SD3's static shift; Sana's flow DPM-Solver config read as the same rectified flow
        assert teacher.schedule.shift == 3.0
    teacher.train()
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())


def test_sd3_prompt_encoder_matches_pipeline(folders, teachers):
    pipe = DiffusionPipeline.from_pretrained(folders["sd3"], local_files_only=True)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, None, None, device="cpu", max_sequence_length=TEXT_LENGTH
    )
    encoder = teachers["sd3"].prompt_encoder
    cond, null = encoder.encode(PROMPTS), encoder.null(2)
    assert cond.prompt_embeds.shape == (2, 2 * TEXT_LENGTH, 64)  # 16 CLIP tokens, then 16 T5 tokens
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    torch.testing.assert_close(null.prompt_embeds, negative)
    torch.testing.assert_close(null.pooled, negative_pooled)


@pytest.mark.parametrize("name", ["flux", "flux_dev"])
def test_flux_prompt_encoder_matches_pipeline(folders, teachers, name):
    pipe = FluxPipeline.from_pretrained(folders[name], local_files_only=True)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=TEXT_LENGTH)
    cond = teachers[name].prompt_encoder.encode(PROMPTS)
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    assert not text_ids.any()  # the text positions the FLUX family passes: all zero
    if name == "flux_dev":
        assert cond.guidance.tolist() == [3.5, 3.5]
    else:
        assert cond.guidance is None


def test_sana_prompt_encoder_matches_pipeline(folders, teachers):
    from workers.add.families.sana import SANA_INSTRUCTION

    pipe = DiffusionPipeline.from_pretrained(folders["sana"], local_files_only=True)
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        PROMPTS, True, max_sequence_length=TEXT_LENGTH, complex_human_instruction=SANA_INSTRUCTION
    )
    encoder = teachers["sana"].prompt_encoder
    cond, null = encoder.encode(PROMPTS), encoder.null(2)
    assert cond.prompt_embeds.shape == (2, TEXT_LENGTH, 32)
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    assert torch.equal(cond.prompt_mask, mask)
    torch.testing.assert_close(null.prompt_embeds, negative)
    assert torch.equal(null.prompt_mask, negative_mask)
    weights = mask.unsqueeze(-1).float()
    torch.testing.assert_close(cond.pooled, (embeds * weights).sum(1) / weights.sum(1))


@pytest.mark.parametrize("name", ["sd3", "flux", "flux_dev"])
def test_one_step_sample_equals_the_pipelines(folders, teachers, name):
    """From pure noise (σ = 1, t = T − 1) one Euler step of the pipeline lands on x − v: the teacher's x0."""
    teacher = teachers[name]
    pipe = DiffusionPipeline.from_pretrained(folders[name], local_files_only=True)
    x = torch.randn(B, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(1))
    kwargs = {"num_inference_steps": 1, "output_type": "latent", "height": PIXEL_SIZE, "width": PIXEL_SIZE}
    kwargs |= {"max_sequence_length": TEXT_LENGTH}
    if name == "sd3":
        out = pipe(PROMPTS, latents=x, guidance_scale=1.0, **kwargs).images
    else:  # FLUX takes and returns packed latents; a guidance-distilled one embeds its guidance scale
        packed = FluxPipeline._pack_latents(x, B, 4, LATENT_SIZE, LATENT_SIZE)
        out = pipe(PROMPTS, latents=packed, guidance_scale=3.5, **kwargs).images
        out = FluxPipeline._unpack_latents(out, PIXEL_SIZE, PIXEL_SIZE, 2)
    T = teacher.schedule.num_train_timesteps
    with torch.no_grad():
        x0 = teacher.denoise(x, torch.full((B,), T - 1), teacher.encode_prompts(PROMPTS))
    torch.testing.assert_close(x0, out, atol=1e-5, rtol=1e-4)


def test_sana_model_output_is_the_transformers_velocity(teachers):
    teacher = teachers["sana"]
    cond = teacher.encode_prompts(PROMPTS)
    x, t = torch.randn(B, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([999, 300])
    sigma_T = teacher.schedule.sigma(t, x).flatten() * 1000  # the pipeline's timestep: σ·T
    with torch.no_grad():
        v = teacher.unet(x, cond.prompt_embeds, sigma_T, encoder_attention_mask=cond.prompt_mask).sample
        torch.testing.assert_close(teacher.denoiser.model_output(x, t, cond), v)
        torch.testing.assert_close(teacher.denoise(x, t, cond), x - teacher.schedule.sigma(t, x) * v)


def test_guidance_distilled_teacher_runs_no_cfg(folders, teachers):
    """FLUX.1-dev: the guidance scale is the loaded input embedding; CFG's scale changes nothing."""
    teacher = teachers["flux_dev"]
    cond, x, t = teacher.encode_prompts(PROMPTS), torch.randn(B, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([900, 500])
    with torch.no_grad():
        x0 = teacher.denoise(x, t, cond, guidance_scale=1.0)
        torch.testing.assert_close(teacher.denoise(x, t, cond, guidance_scale=5.0), x0)
        x0_cond, x0_uncond = teacher.denoise_cond_uncond(x, t, cond)
        torch.testing.assert_close(x0_cond, x0)
        torch.testing.assert_close(x0_uncond, x0)
        other = load_teacher(folders["flux_dev"], guidance=1.0)
        assert not torch.allclose(other.denoise(x, t, other.encode_prompts(PROMPTS)), x0)
    plain = teachers["flux"]
    cond = plain.encode_prompts(PROMPTS)
    with torch.no_grad():  # a FLUX without the embedding does run CFG
        assert not torch.allclose(plain.denoise(x, t, cond, 4.0), plain.denoise(x, t, cond, 1.0))
    with pytest.raises(ValueError, match="FluxTransformer2DModel has no guidance embedding"):
        load_teacher(folders["flux"], guidance=3.5)


# ---- the ADD step: both losses, LADD on the teacher's tokens or DINOv2 on decoded pixels ----


@pytest.mark.parametrize("backbone", ["teacher", "dinov2"])
@pytest.mark.parametrize("name", FAMILIES)
def test_add_step_gradients_reach_the_student_only(teachers, name, backbone):
    teacher = teachers[name]
    models, opt_g, opt_d = make(teacher, backbone)
    batch = batch_for(teacher)
    metrics, fake = student_step(models, ADDObjective(), batch, opt_g, torch.Generator().manual_seed(0))
    assert metrics["loss/distill"] > 0 and metrics["balance/grad_adv_x"] > 0
    assert has_grad(models.student.trainable_parameters())
    frozen = {
        "teacher": teacher.unet,
        "text encoders": teacher.prompt_encoder,
        "vae": teacher.codec,
    }
    if backbone == "dinov2":  # the teacher backbone is the teacher itself, kept out of D's module tree
        frozen["F"] = models.discriminator.feature_network
    for part, module in frozen.items():
        params = list(module.parameters())
        assert params and all(p.grad is None and not p.requires_grad for p in params), part
    assert not has_grad(models.discriminator.trainable_parameters())
    metrics = discriminator_step(models, ADDObjective(), batch, fake, opt_d, step=0)
    assert has_grad(models.discriminator.trainable_parameters()) and torch.isfinite(torch.tensor(metrics["loss/D"]))
    for part, module in frozen.items():
        assert all(p.grad is None for p in module.parameters()), part


EXPECTED_TAPS = {  # default: up to four blocks spread evenly over the whole stack, the last one included
    "sd3": ["transformer_blocks.0", "transformer_blocks.1"],
    "flux": ["transformer_blocks.0", "single_transformer_blocks.0"],
    "sana": ["transformer_blocks.0", "transformer_blocks.1"],
}
GRID = {"sd3": (16, 4, 4), "flux": (16, 4, 4), "sana": (16, 8, 8)}  # (inner dim, H/p, W/p) on 8×8 latents


@pytest.mark.parametrize("name", ["sd3", "flux", "sana"])
def test_ladd_features_are_the_image_tokens_on_the_latent_grid(teachers, name):
    teacher = teachers[name]
    F = build_discriminator("teacher", cond_dim=0, teacher=teacher).feature_network
    assert F.taps == EXPECTED_TAPS[name] and F.channels == [GRID[name][0]] * 2
    x, cond = batch_for(teacher).x0, teacher.encode_prompts(PROMPTS)
    # the same t̂ and ε′ as F draws, and the tapped blocks' raw outputs from a full forward
    g = torch.Generator().manual_seed(5)
    t_hat = F.sample_t_hat(B, g)
    eps = torch.randn(x.shape, generator=g)
    blocks = [teacher.unet.get_submodule(n) for n in F.taps]
    raw = []
    handles = [b.register_forward_hook(lambda m, a, out: raw.append(out)) for b in blocks]
    with torch.no_grad():
        teacher.denoiser.model_output(teacher.schedule.add_noise(x, eps, t_hat), t_hat, cond)
    for h in handles:
        h.remove()
    with torch.no_grad():
        feats, c_extra = F(x, cond, torch.Generator().manual_seed(5))
    assert c_extra.shape == (B, F.cond_dim_extra)
    for grid, out in zip(feats, raw, strict=True):
        assert grid.shape == (B, *GRID[name])
        tokens = out if name == "sana" else out[1]  # joint blocks: (encoder_hidden_states, hidden_states)
        assert tokens.shape[1] == GRID[name][1] * GRID[name][2]  # image tokens, not the text's
        torch.testing.assert_close(grid.flatten(2).transpose(1, 2), tokens)


def test_ladd_forward_stops_after_the_last_tapped_block(teachers):
    """Tapping FLUX's double block only: its single block and output layer never run for F."""
    teacher = teachers["flux"]
    F = build_discriminator("teacher", cond_dim=0, teacher=teacher, taps=["transformer_blocks.0"]).feature_network
    ran = []
    later = [teacher.unet.single_transformer_blocks[0], teacher.unet.proj_out]
    handles = [m.register_forward_hook(lambda m, a, out: ran.append(m)) for m in later]
    x, cond = batch_for(teacher).x0, teacher.encode_prompts(PROMPTS)
    try:
        with torch.no_grad():
            F(x, cond)
            assert ran == []
            teacher.denoiser.model_output(x, torch.tensor([5, 5]), cond)  # a full forward does run them
        assert ran == later
    finally:
        for h in handles:
            h.remove()
    with pytest.raises(ValueError, match="teacher tap 'transformer_blocks.7' names no module"):
        build_discriminator("teacher", cond_dim=0, teacher=teacher, taps=["transformer_blocks.7"])


# ---- LoRA ----

LORA_MODULES = {"sd3": "add_q_proj", "flux": "add_q_proj", "flux_dev": "add_q_proj", "sana": "to_q"}


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_student_trains_adapters_on_the_attention_projections(teachers, name):
    teacher = teachers[name]
    models, opt_g, _ = make(teacher, lora_rank=2)
    named = dict(models.student.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert any(f"{LORA_MODULES[name]}.lora_A" in n for n in trainable)
    student_step(models, ADDObjective(), batch_for(teacher), opt_g, torch.Generator().manual_seed(0))
    assert has_grad(models.student.trainable_parameters())
    assert all(p.grad is None for n, p in named.items() if "lora" not in n)
    assert all(p.grad is None for p in teacher.parameters())


# ---- FSDP2: the student sharded per transformer block, on two gloo ranks ----


def _fsdp_step(folder: str, rank: int) -> dict:
    """One ADD step (θ and the heads) with θ sharded and ψ's blocks sharded; what rank 0 reports."""
    from workers.add.step import Update, discriminator_backward, student_backward
    from workers.train.fsdp import ReplicaSync, full_norm, local_fractions, shard_unet, unet_blocks

    torch.manual_seed(0)
    teacher = load_teacher(folder)
    models, _, _ = make(teacher)
    blocks = unet_blocks(models.student.unet)
    shard_unet(models.student.unet, root=True)
    shard_unet(teacher.unet, root=False)
    sync = ReplicaSync(models.discriminator.heads)
    sync.broadcast()
    params = models.student.trainable_parameters()
    theta = Update(params, torch.optim.SGD(params, lr=1e-3))
    heads = Update(sync.params, torch.optim.SGD(sync.params, lr=1e-3))
    before = [p.detach().to_local().clone() for p in params]
    generator = torch.Generator().manual_seed(rank)  # each rank its own micro-batch
    theta.zero_grad()
    _, fake = student_backward(models, ADDObjective(), batch_for(teacher), theta, generator)
    norm_g = full_norm(theta.clip())
    theta.step()
    heads.zero_grad()
    discriminator_backward(models, ADDObjective(), batch_for(teacher), fake, heads, 0, generator)
    sync.all_reduce_grads()
    norm_d = full_norm(heads.clip())
    heads.step()
    return {
        "blocks": len(blocks),
        "fraction_max": max(local_fractions(models.student.unet)),
        "norm_g": norm_g,
        "norm_d": norm_d,
        "moved": sum(float((p.detach().to_local() - b).abs().sum()) for p, b in zip(params, before, strict=True)),
        "teacher_grads": any(p.grad is not None for p in teacher.parameters()),
    }


def _fsdp_worker(rank: int, world: int, store: str, folders: dict, result: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        summary = {name: _fsdp_step(folder, rank) for name, folder in folders.items()}
        if rank == 0:
            with open(result, "w") as f:
                json.dump(summary, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_steps(folders, tmp_path_factory):
    """One two-rank gloo group runs the step for every family (one spawn: the imports dominate)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    names = {name: str(folders[name]) for name in ("sd3", "flux", "sana")}
    mp.spawn(_fsdp_worker, args=(2, str(tmp / "store"), names, str(tmp / "result.json")), nprocs=2, join=True)
    return json.loads((tmp / "result.json").read_text())


@pytest.mark.parametrize("name", ["sd3", "flux", "sana"])
def test_fsdp2_one_step_on_two_gloo_ranks(fsdp_steps, name):
    summary = fsdp_steps[name]
    assert summary["blocks"] == 2  # two transformer blocks (FLUX: one double, one single), each its own unit
    assert summary["fraction_max"] <= 0.75  # every parameter sharded across the two ranks
    assert summary["norm_g"] > 0 and summary["norm_d"] > 0 and summary["moved"] > 0
    assert not summary["teacher_grads"]


# ---- the loader's refusals ----


def _replace_transformer(folder, donor, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "teacher")
    shutil.rmtree(copy / "transformer")
    shutil.copytree(donor / "transformer", copy / "transformer")
    return copy


def test_unsupported_transformer_class_names_the_supported_ones(folders, tmp_path):
    folder = shutil.copytree(folders["sd3"], tmp_path / "t")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(
        json.dumps({**config, "_class_name": "PixArtTransformer2DModel"})
    )
    with pytest.raises(ValueError, match="unsupported class 'PixArtTransformer2DModel'") as err:
        load_teacher(folder)
    for supported in ("SD3Transformer2DModel", "FluxTransformer2DModel", "SanaTransformer2DModel"):
        assert supported in str(err.value)
    assert str(folder) in str(err.value)


def test_flux_transformer_with_sd3_encoders_is_refused(folders, tmp_path):
    folder = _replace_transformer(folders["sd3"], folders["flux"], tmp_path)
    with pytest.raises(ValueError, match="text_encoder_2 is a 'clip_text_model' model, but a FLUX transformer"):
        load_teacher(folder)


def test_sd3_transformer_with_flux_encoders_is_refused(folders, tmp_path):
    folder = _replace_transformer(folders["flux"], folders["sd3"], tmp_path)
    with pytest.raises(ValueError, match="text_encoder_2 is a 't5' model, but an SD3 transformer"):
        load_teacher(folder)


def test_sana_transformer_with_a_clip_encoder_is_refused(folders, tmp_path):
    folder = _replace_transformer(folders["sana"], folders["sd3"], tmp_path)  # an SD3 net in Sana's folder
    with pytest.raises(FileNotFoundError, match="has no text_encoder_2, tokenizer_2: an SD3 transformer"):
        load_teacher(folder)
    folder = _replace_transformer(folders["sd3"], folders["sana"], tmp_path / "x")
    with pytest.raises(ValueError, match="text_encoder is a 'clip_text_model' model, but a Sana transformer"):
        load_teacher(folder)


def test_sd3_without_t5(folders, tmp_path):
    """Missing T5 is refused with the reason; marked absent in model_index.json it runs as the pipeline does."""
    folder = shutil.copytree(folders["sd3"], tmp_path / "sd3")
    shutil.rmtree(folder / "text_encoder_3")
    shutil.rmtree(folder / "tokenizer_3")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if not k.endswith("_3")}))
    with pytest.raises(FileNotFoundError, match="has no text_encoder_3, tokenizer_3: an SD3 transformer"):
        load_teacher(folder)
    no_t5 = save_tiny_sd3(tmp_path / "no_t5", t5=False)
    teacher = load_teacher(no_t5)
    cond = teacher.encode_prompts(PROMPTS)
    pipe = DiffusionPipeline.from_pretrained(no_t5, local_files_only=True, text_encoder_3=None, tokenizer_3=None)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", max_sequence_length=256)
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    assert not cond.prompt_embeds[:, TEXT_LENGTH:].any()  # T5's tokens are zeros
    assert isinstance(teacher.unet, SD3Transformer2DModel)


@pytest.mark.parametrize("name", ["sd3", "flux", "sana"])
def test_bf16_teacher_follows_the_float32_one(folders, teachers, name):
    """``load_teacher(dtype=bfloat16)``: every part in bf16 (GPU recipes), the same x0 to bf16's precision."""
    teacher = load_teacher(folders[name], dtype=torch.bfloat16)
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    cond = teacher.encode_prompts(PROMPTS)
    assert cond.prompt_embeds.dtype == torch.bfloat16
    x, t = torch.randn(B, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([999, 600])
    with torch.no_grad():
        x0 = teacher.denoise(x.bfloat16(), t, cond)
        reference = teachers[name].denoise(x, t, teachers[name].encode_prompts(PROMPTS))
    assert x0.dtype == torch.bfloat16
    torch.testing.assert_close(x0.float(), reference, atol=0.1, rtol=0.05)
