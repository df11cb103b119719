"""FSDP2 for the ADD models: θ and ψ sharded block by block, the heads φ replicated and synced.

- Student θ: ``fully_shard`` on every block of its network (a UNet's down, mid and up blocks; a
  transformer's blocks: SD3's and Sana's ``transformer_blocks``, FLUX's double and single blocks; the
  family says which), then on the network itself, which then holds the rest (patch or conv input,
  time, text and class embeddings, output layers). Every parameter is a
  DTensor sharded on dim 0 across the ranks; its gradient is reduce-scattered (averaged) in backward.
- Teacher ψ: the same per block, but not at the root. The LADD feature network stops the teacher's
  forward once its tapped blocks have run (``features.captured_outputs``), so a root FSDP module
  would never see its post-forward; the root's own layers are small and stay replicated. Its text
  encoders and VAE are replicated too (frozen; move caption encoding into Ray Data to save them).
- Heads φ: small, so replicated rather than sharded: identical initial weights (broadcast from
  rank 0), gradients all-reduced and averaged in one flat buffer after the micro-batches
  (``ReplicaSync``), so every rank takes the same optimizer step and the heads never drift.
  With ``resources.fsdp: false`` the student is replicated the same way (DDP-like, full memory). DDP would
  need every forward to go through its wrapper; the ADD step calls ``D.features``/``D.head_logits``
  directly, so the all-reduce is explicit. Spectral norm's power-iteration vectors are a function
  of the weights and the number of forwards, both the same on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from workers.add.families import family_of


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The FSDP units of a network of a supported family (``Family.blocks``); none for any other."""
    family = family_of(unet)
    return [] if family is None else [block for _, block in family.blocks(unet)]


def shard_unet(unet: nn.Module, *, root: bool = True, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """``fully_shard`` each block of the network ``unet`` (UNet or transformer), then (``root``) the
    network for its remaining layers.

    A network of no supported family (e.g. the toy problem's MLP) is sharded as one unit.
    """
    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    blocks = unet_blocks(unet)
    for block in blocks:
        fully_shard(block, **kwargs)
    if root or not blocks:
        fully_shard(unet, **kwargs)
    return unet


def local_fractions(module: nn.Module) -> list[float]:
    """Per sharded parameter, the fraction of its elements this rank holds (1/world when even)."""
    return [p.to_local().numel() / p.numel() for p in module.parameters() if isinstance(p, DTensor) and p.numel()]


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes this rank holds for ``params`` and their optimizer state (local shards only)."""
    total = sum(_local(p).numel() * p.element_size() for p in params)
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(_local(v).numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def full_norm(norm: Tensor) -> float:
    """A total gradient norm as a float; FSDP's ``clip_grad_norm_`` returns a DTensor."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


class ReplicaSync:
    """Keeps a replicated module (the discriminator heads) identical across ranks.

    ``broadcast()`` once after building (and after loading a checkpoint): parameters and buffers
    (spectral norm's u, v) from rank 0. ``all_reduce_grads()`` after the last micro-batch's
    backward and before clipping. A parameter without a gradient contributes zeros, so every rank
    sends the same buffer layout.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]

    def broadcast(self, src: int = 0) -> None:
        if not distributed() or dist.get_world_size() == 1:
            return
        tensors = [t for t in self.module.state_dict(keep_vars=True).values() if t.is_floating_point()]
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            dist.broadcast(flat, src)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def all_reduce_grads(self) -> None:
        if not distributed() or dist.get_world_size() == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p in self.params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
