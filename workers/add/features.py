"""F, the discriminator's frozen feature networks: DINOv2 on pixels (ADD) or the teacher (LADD).

Both return one tapped feature map per discriminator head, plus the part of the condition vector
that the features themselves bring (the noise level t̂ of LADD). Neither ever trains, but both
pass gradients through to their input: the student learns from the heads through F.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn
from transformers import Dinov2Model

from workers.add.conditioning import Conditioning
from workers.add.families import family_of
from workers.add.frozen import FrozenModule
from workers.add.teacher import Teacher

# ADD and StyleGAN-T feed DINOv2 224-pixel images. The released checkpoints' configs say 518 (the
# size of their position table, which DINOv2 interpolates), so the config is not the default here.
DINOV2_RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureNetwork(FrozenModule):
    """The interface the discriminator builds on.

    - ``forward(x, cond, generator) -> (features, c_extra)``: one tensor per head, (B, C_k, N_k) for
      tokens or (B, C_k, H_k, W_k) for grids, and the extra condition (B, cond_dim_extra) or None.
    - ``channels``: C_k per tap. ``spatial_dims``: 1 (tokens) or 2 (grids).
    - ``input_space``: "pixel" (decoded images in [-1, 1]) or "model" (what the teacher's UNet takes).
    - ``cond_dim_extra``: width of ``c_extra``, 0 when there is none.
    """

    input_space: str
    spatial_dims: int
    channels: list[int]
    cond_dim_extra: int = 0

    def forward(
        self, x: Tensor, cond: Conditioning, generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], Tensor | None]:
        """The tapped features of x, one per head, and the extra condition (or None)."""
        raise NotImplementedError


def default_dinov2_taps(num_layers: int, num_blocks: int = 4) -> list[int]:
    """``hidden_states`` indices: the patch embedding (0) and ``num_blocks`` blocks spread evenly.

    For a 12-block ViT-S this is [0, 3, 6, 9, 12]: the embedding and the outputs of blocks 2, 5, 8,
    11 (zero-based), StyleGAN-T's five heads. The last block is always tapped.
    """
    return sorted({0} | {num_layers * (i + 1) // num_blocks for i in range(num_blocks)})


class DinoV2Features(FeatureNetwork):
    """DINOv2 tokens at the tapped layers of images in [-1, 1] (CLS and register tokens dropped)."""

    input_space = "pixel"
    spatial_dims = 1

    def __init__(
        self,
        model: Dinov2Model | str,
        taps: list[int] | None = None,
        resolution: int | None = DINOV2_RESOLUTION,
    ):
        super().__init__()
        if isinstance(model, str):  # a local directory or a hub id
            try:
                model = Dinov2Model.from_pretrained(model)
            except OSError as err:
                raise FileNotFoundError(
                    f"cannot load the DINOv2 feature network {model!r}: not a local Dinov2Model folder, and as a "
                    f"hub id not loadable here (offline or not cached?): {err}"
                ) from err
        self.model = model
        config = model.config
        num_layers = config.num_hidden_layers
        self.taps = list(default_dinov2_taps(num_layers) if taps is None else taps)
        bad = [k for k in self.taps if not isinstance(k, int) or not 0 <= k <= num_layers]
        if bad or not self.taps:
            raise ValueError(
                f"DINOv2 taps {self.taps} invalid: each must be a hidden_states index in 0..{num_layers} "
                "(0 is the patch embedding, i the output of block i)"
            )
        self.resolution = resolution
        patch_size = config.patch_size
        self.patch_size = patch_size if isinstance(patch_size, int) else min(patch_size)
        self.num_prefix_tokens = 1 + getattr(config, "num_register_tokens", 0)  # CLS (+ registers)
        self.channels = [config.hidden_size] * len(self.taps)
        self.embedding_dim = config.hidden_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def pixel_values(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] as DINOv2 expects them: RGB, resized, ImageNet-normalised."""
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            raise ValueError(f"DINOv2 takes 1- or 3-channel images, got {x.shape[1]} channels")
        resized = ""
        if self.resolution is not None and tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            resized = f" (after resizing to resolution {self.resolution})"
            # Antialiasing matters when downsampling large images; it is differentiable like plain bilinear.
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", align_corners=False, antialias=True)
        h, w = x.shape[-2:]
        if min(h, w) < self.patch_size:
            raise ValueError(
                f"image {h}x{w}{resized} is smaller than the DINOv2 patch size {self.patch_size}: "
                "use larger images or a larger resolution"
            )
        x = ((x + 1) / 2 - self.mean.to(x)) / self.std.to(x)
        return x.to(self.model.dtype)

    def forward(
        self, x: Tensor, cond: Conditioning | None = None, generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], None]:
        """Tokens (B, C, N) at each tap; DINOv2 adds nothing to the condition."""
        out = self.model(pixel_values=self.pixel_values(x), output_hidden_states=True)
        tokens = [out.hidden_states[k][:, self.num_prefix_tokens :] for k in self.taps]
        return [t.transpose(1, 2) for t in tokens], None

    def image_embedding(self, x: Tensor) -> Tensor:
        """The last layer's CLS token (B, embedding_dim): the image condition of ADD."""
        return self.model(pixel_values=self.pixel_values(x)).pooler_output


def default_teacher_taps(net: nn.Module) -> list[str]:
    """The family's default taps: a UNet's down blocks and mid block; transformer blocks spread evenly."""
    family = family_of(net)
    if family is None:
        raise ValueError(f"{type(net).__name__} is of no supported family: name the teacher taps explicitly")
    return family.default_taps(net)


def _tapped_module(net: nn.Module, name: str) -> nn.Module:
    """The teacher submodule named by a tap, or an error naming the tap."""
    try:
        return net.get_submodule(name)
    except AttributeError:
        raise ValueError(f"teacher tap {name!r} names no module of {type(net).__name__}") from None


class _AllCaptured(Exception):
    """Raised by the hook that completes the capture: the rest of the network is not needed."""


@contextmanager
def captured_outputs(modules: list[nn.Module]):
    """Collect each module's output (as the module returned it) during one forward; the hooks live only
    inside the block.

    Once every module has fired the forward is cut short (the up blocks of a UNet, the blocks of a
    transformer after the last tap are wasted work for the discriminator).
    """
    outputs: list = [None] * len(modules)

    def store(index: int, module: nn.Module, args, output) -> None:
        outputs[index] = output
        if all(o is not None for o in outputs):
            raise _AllCaptured

    handles = [m.register_forward_hook(partial(store, i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    except _AllCaptured:
        pass
    finally:
        for handle in handles:
            handle.remove()


class TeacherFeatures(FeatureNetwork):
    """LADD: the frozen teacher ψ as feature network, on inputs re-noised to a logit-normal t̂.

    x_t̂ = α_t̂·x + σ_t̂·ε with t̂/T = sigmoid(n), n ~ N(t_hat_loc, t_hat_scale²), on the teacher's own
    schedule (DDPM or the shifted flow grid); the features are the outputs of the tapped blocks as grids
    (B, C, h, w): a UNet block's hidden state, or a transformer block's image tokens on the latent token
    grid (h, w) = (H/p, W/p); the extra condition is a sinusoidal embedding of t̂, so the heads know how
    noisy the sample they judge was.
    """

    input_space = "model"
    spatial_dims = 2

    def __init__(
        self,
        teacher: Teacher,
        taps: list[str] | None = None,
        t_hat_loc: float = 0.0,
        t_hat_scale: float = 1.0,
        t_embedding_dim: int = 64,
    ):
        super().__init__()
        # Shared with the distillation loss, not owned: kept out of the module tree so the
        # discriminator's state_dict, .to() and DDP broadcasts do not carry a second teacher.
        self.__dict__["teacher"] = teacher
        net = teacher.unet
        self.family = family_of(net)
        if self.family is None:
            raise ValueError(f"{type(net).__name__} is of no supported family: it cannot be the feature network")
        self.taps = list(default_teacher_taps(net) if taps is None else taps)
        if not self.taps:
            raise ValueError("teacher taps must not be empty")
        for name in self.taps:
            _tapped_module(net, name)
        self.channels = [self.family.tap_channels(net, name) for name in self.taps]
        self.t_hat_loc = t_hat_loc
        self.t_hat_scale = t_hat_scale
        self.cond_dim_extra = t_embedding_dim
        self.freeze()

    def sample_t_hat(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """t̂ per sample, integer timesteps with t̂/(T−1) logit-normal."""
        T = self.teacher.schedule.num_train_timesteps
        gen_device = generator.device if generator is not None else device
        n = torch.randn(batch_size, generator=generator, device=gen_device)
        u = torch.sigmoid(self.t_hat_loc + self.t_hat_scale * n)
        return (u * (T - 1)).round().long().to(device)

    def forward(
        self, x: Tensor, cond: Conditioning, generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """Tapped block outputs of the teacher on x re-noised to t̂, and the embedding of t̂."""
        t_hat = self.sample_t_hat(x.shape[0], generator, x.device)
        eps = torch.randn(x.shape, generator=generator, device=generator.device if generator is not None else x.device)
        x_t = self.teacher.schedule.add_noise(x, eps.to(x), t_hat)
        net = self.teacher.unet
        modules = [_tapped_module(net, name) for name in self.taps]
        # No no_grad here: the student's gradient flows through the frozen teacher to x.
        with captured_outputs(modules) as outputs:
            self.teacher.denoiser.model_output(x_t.to(getattr(net, "dtype", x.dtype)), t_hat, cond)
        missing = [name for name, f in zip(self.taps, outputs, strict=True) if f is None]
        if missing:
            raise ValueError(f"teacher taps {missing} did not run in the network's forward")
        feats = [self.family.tap_grid(net, output, x) for output in outputs]
        c_extra = get_timestep_embedding(
            t_hat.float(), self.cond_dim_extra, flip_sin_to_cos=True, downscale_freq_shift=0
        )
        return feats, c_extra.to(x.device)
