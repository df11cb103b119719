"""load_teacher on every tiny layout, the prompt encoders, the latent codec, and the loader's errors."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from tests.tiny_models import (
    LATENT_SIZE,
    NUM_CLASSES,
    PIXEL_SIZE,
    TEXT_DIM,
    TEXT_LENGTH,
    save_tiny_pixel_unet,
    save_tiny_sd,
    save_tiny_sdxl,
    save_tiny_sentence_cond_unet,
    tiny_bert_model,
    tiny_bert_tokenizer,
    tiny_vae,
)
from workers.add.codec import LatentCodec
from workers.add.components import load_teacher
from workers.add.text_encoders import (
    CLIPPromptEncoder,
    LabelPromptEncoder,
    SDXLPromptEncoder,
    SentencePromptEncoder,
)

PROMPTS = ["a photo of a sneaker", "a black bag"]
SAVERS = {
    "sd": save_tiny_sd,
    "sdxl": save_tiny_sdxl,
    "pixel": lambda p: save_tiny_pixel_unet(p, "none"),
    "class": lambda p: save_tiny_pixel_unet(p, "class"),
    "sentence": lambda p: save_tiny_pixel_unet(p, "sentence"),
    "sentence_cond": save_tiny_sentence_cond_unet,
}
# kind: (prompt encoder class, channels, size, prompts)
EXPECTED = {
    "sd": (CLIPPromptEncoder, 4, LATENT_SIZE, PROMPTS),
    "sdxl": (SDXLPromptEncoder, 4, LATENT_SIZE, PROMPTS),
    "pixel": (type(None), 3, PIXEL_SIZE, None),
    "class": (LabelPromptEncoder, 3, PIXEL_SIZE, ["3", 7]),
    "sentence": (SentencePromptEncoder, 3, PIXEL_SIZE, PROMPTS),
    "sentence_cond": (SentencePromptEncoder, 3, PIXEL_SIZE, PROMPTS),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {kind: save(root / kind) for kind, save in SAVERS.items()}


@pytest.fixture(scope="module")
def teachers(folders):
    return {kind: load_teacher(path) for kind, path in folders.items()}


@pytest.mark.parametrize("kind", list(SAVERS))
def test_loaded_teacher_denoises(teachers, kind):
    teacher = teachers[kind]
    encoder_class, channels, size, prompts = EXPECTED[kind]
    assert type(teacher.prompt_encoder) is encoder_class
    assert (teacher.codec is not None) == (channels == 4)
    x_t, t = torch.randn(2, channels, size, size), torch.tensor([999, 400])
    cond = teacher.encode_prompts(prompts) if prompts is not None else None
    with torch.no_grad():
        x0 = teacher.denoise(x_t, t, cond, guidance_scale=1.0)
        x0_cfg = teacher.denoise(x_t, t, cond, guidance_scale=4.0)
    assert x0.shape == x_t.shape and torch.isfinite(x0).all() and torch.isfinite(x0_cfg).all()
    if prompts is None:
        assert teacher.null_conditioning(2) is None and torch.equal(x0, x0_cfg)
    else:
        assert not torch.allclose(x0, x0_cfg)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "class", "sentence", "sentence_cond"])
def test_null_matches_encode(teachers, kind):
    encoder = teachers[kind].prompt_encoder
    cond, null = encoder.encode(EXPECTED[kind][3]), encoder.null(3)
    assert len(cond) == 2 and len(null) == 3
    assert cond.pooled.shape == (2, encoder.pooled_dim)
    for name, value in cond._tensors().items():
        assert getattr(null, name).shape[1:] == value.shape[1:], name
        assert getattr(null, name).dtype == value.dtype, name
    assert set(null._tensors()) == set(cond._tensors())


def test_teacher_is_frozen(teachers):
    for kind, teacher in teachers.items():
        teacher.train()
        assert not any(p.requires_grad for p in teacher.parameters()), kind
        assert not any(m.training for m in teacher.modules()), kind
        for part in (teacher.prompt_encoder, teacher.codec):
            if part is not None:
                part.train()
                assert not any(m.training for m in part.modules()), kind


def test_prediction_type_override(folders):
    teacher = load_teacher(folders["pixel"], prediction_type="v_prediction")
    assert teacher.schedule.prediction_type == "v_prediction"
    assert teacher.scheduler_config["prediction_type"] == "v_prediction"
    assert load_teacher(folders["pixel"]).schedule.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="unknown prediction type 'x0'"):
        load_teacher(folders["pixel"], prediction_type="x0")


def test_clip_encoder_matches_sd_pipeline(folders, teachers):
    pipe = StableDiffusionPipeline.from_pretrained(folders["sd"], local_files_only=True)
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    encoder = teachers["sd"].prompt_encoder
    cond = encoder.encode(PROMPTS)
    assert cond.prompt_embeds.shape == (2, TEXT_LENGTH, TEXT_DIM)
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    torch.testing.assert_close(encoder.null(2).prompt_embeds, negative)
    pooled = pipe.text_encoder(pipe.tokenizer(PROMPTS, padding="max_length", return_tensors="pt").input_ids)
    torch.testing.assert_close(cond.pooled, pooled.pooler_output)


def test_sdxl_encoder_matches_sdxl_pipeline(folders, teachers):
    pipe = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"], local_files_only=True)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    encoder = teachers["sdxl"].prompt_encoder
    cond, null = encoder.encode(PROMPTS), encoder.null(2)
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    torch.testing.assert_close(null.prompt_embeds, negative)  # zeros: force_zeros_for_empty_prompt
    torch.testing.assert_close(null.pooled, negative_pooled)
    size = LATENT_SIZE * 2  # default resolution: UNet sample size times the VAE's downsampling
    expected_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
    torch.testing.assert_close(cond.time_ids, expected_ids)
    torch.testing.assert_close(null.time_ids, expected_ids)


def test_sdxl_resolution_and_empty_prompt_null(folders, tmp_path):
    folder = shutil.copytree(folders["sdxl"], tmp_path / "sdxl")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    encoder = load_teacher(folder, resolution=64).prompt_encoder
    assert encoder.encode(["a bag"]).time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    empty = encoder.encode([""])
    torch.testing.assert_close(encoder.null(1).prompt_embeds, empty.prompt_embeds)
    assert empty.pooled.abs().sum() > 0


def test_sentence_encoder_mean_pools():
    tokenizer = tiny_bert_tokenizer()
    model = tiny_bert_model(tokenizer)
    encoder = SentencePromptEncoder(tokenizer, model, normalize=False, as_class_labels=True)
    cond = encoder.encode(["a bag", "a photo of a white shirt"])
    assert cond.prompt_embeds.shape == (2, TEXT_LENGTH, TEXT_DIM)
    assert torch.equal(cond.class_labels, cond.pooled)
    batch = tokenizer(["a bag"], return_tensors="pt")
    expected = model(**batch).last_hidden_state.mean(1)  # no padding: a plain mean
    torch.testing.assert_close(cond.pooled[:1], expected)
    normed = SentencePromptEncoder(tokenizer, model, with_tokens=False)
    out = normed.encode(["a bag", "a photo of a white shirt"])
    assert out.prompt_embeds is None and out.class_labels is None
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out.pooled, torch.nn.functional.normalize(cond.pooled, dim=-1))
    assert not any(p.requires_grad for p in encoder.parameters())


def test_label_encoder():
    encoder = LabelPromptEncoder(NUM_CLASSES + 1)
    cond = encoder.encode(["3", 5])
    assert cond.class_labels.tolist() == [3, 5] and cond.class_labels.dtype == torch.long
    assert cond.pooled.shape == (2, NUM_CLASSES + 1) and cond.pooled.argmax(1).tolist() == [3, 5]
    assert encoder.null(2).class_labels.tolist() == [NUM_CLASSES, NUM_CLASSES]
    assert LabelPromptEncoder(4, null_label=0).null(1).class_labels.tolist() == [0]
    with pytest.raises(ValueError, match="out of range"):
        encoder.encode([NUM_CLASSES + 1])
    with pytest.raises(ValueError, match="integer"):
        encoder.encode(["sneaker"])


def test_null_follows_dtype():
    encoder = SentencePromptEncoder(tiny_bert_tokenizer(), tiny_bert_model(tiny_bert_tokenizer()))
    encoder.to(torch.float64)
    assert encoder.null(2).pooled.dtype == torch.float64
    assert encoder.encode(["a bag"]).pooled.dtype == torch.float64


@pytest.mark.parametrize("shift_factor", [None, 0.1])
def test_codec_round_trip_and_gradients(shift_factor):
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.5, shift_factor=shift_factor)
    codec = LatentCodec(vae)
    assert codec.latent_channels == 4 and codec.downsample_factor == 2
    pixels = torch.rand(2, 3, PIXEL_SIZE, PIXEL_SIZE) * 2 - 1
    latents = codec.encode(pixels)
    assert latents.shape == (2, 4, LATENT_SIZE, LATENT_SIZE) and not latents.requires_grad
    mode = vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(latents, (mode - (shift_factor or 0.0)) * 0.5)
    latents.requires_grad_(True)
    decoded = codec.decode(latents)
    assert decoded.shape == pixels.shape
    torch.testing.assert_close(decoded, vae.decode(mode).sample)
    decoded.square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in codec.parameters())


# ---- errors: each names the path (or hub id) and what is missing ----


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        load_teacher(tmp_path / "nope")


def test_source_is_a_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model.safetensors is a file"):
        load_teacher(tmp_path / "model.safetensors")


def test_no_unet_config(folders, tmp_path):
    folder = shutil.copytree(folders["pixel"], tmp_path / "t")
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder} has no unet/config.json"):
        load_teacher(folder)


def test_no_scheduler_config(folders, tmp_path):
    folder = shutil.copytree(folders["pixel"], tmp_path / "t")
    shutil.rmtree(folder / "scheduler")
    with pytest.raises(FileNotFoundError, match=f"{folder} has no scheduler/scheduler_config.json"):
        load_teacher(folder)


def test_model_index_lists_missing_component(folders, tmp_path):
    folder = shutil.copytree(folders["sd"], tmp_path / "sd")
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(FileNotFoundError, match="lists text_encoder, but .* has no such folder") as err:
        load_teacher(folder)
    assert str(folder / "model_index.json") in str(err.value)


def test_sentence_unet_without_text_encoder(folders, tmp_path):
    folder = shutil.copytree(folders["sentence"], tmp_path / "s")
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(FileNotFoundError, match=f"{folder} has no tokenizer: a UNet2DModel"):
        load_teacher(folder)


def test_unknown_unet_class(folders, tmp_path):
    folder = shutil.copytree(folders["pixel"], tmp_path / "t")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(
        json.dumps({**config, "_class_name": "UNet3DConditionModel"})
    )
    with pytest.raises(ValueError, match="unsupported class 'UNet3DConditionModel'") as err:
        load_teacher(folder)
    assert str(folder) in str(err.value)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_unreachable_hub_id():
    with pytest.raises(FileNotFoundError, match="'add-tests/no-such-teacher'.*hub id"):
        load_teacher("add-tests/no-such-teacher")
