"""Plain diffusion training of a caption-conditioned pixel teacher: the benchmark's teachers.

x_t = α_t x0 + σ_t ε at a drawn t; the network (``workers/diffusion/networks.py``: the UNet, DDPM
and v-prediction, or the SD3-shaped MMDiT, rectified flow and velocity) regresses its prediction
type's target given the caption (its pooled sentence embedding, and its tokens for the MMDiT),
which is dropped for the empty caption with probability ``caption_dropout`` so classifier-free
guidance works. The EMA of the weights, or the weights themselves, are exported. Checkpoints are
atomic and every random draw is a pure function of (seed, step), so a resumed run continues exactly.

The images and captions come from a ``CaptionedImages`` source: ``FashionMnistIdx`` (the idx files,
each draw pairing an image with a random training template of its label) or ``ShardCaptions``
(image-caption Parquet shards, each image with the caption it was written with). A job file that
trains from shards and tracks to MLflow is ``orchestrator/teacher_job.py``.

Example (two to three hours on 2 CPU cores; resumable, run it in the background):
    nohup addctl teacher train-idx --out runs/fashion-mnist-teacher --steps 5000 &
    addctl teacher export runs/fashion-mnist-teacher jobs/fashion-mnist/teacher
"""

from __future__ import annotations

import copy
import json
import posixpath
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from workers.add.conditioning import Conditioning
from workers.add.text_encoders import MINILM_PACKAGE, SentencePromptEncoder, package_model_path
from workers.data.fashion_mnist import (
    FASHION_MNIST_IDX,
    caption_for,
    load_fashion_mnist,
    pad_image,
    train_caption_templates,
)
from workers.data.storage import StorageOptions, atomic_write, display_uri, resolve
from workers.diffusion.config import TeacherNetworkSpec, network_of
from workers.diffusion.networks import teacher_network


def drop_captions(captions: Conditioning, drop: torch.Tensor, null: Conditioning) -> Conditioning:
    """Caption dropout: the rows of ``captions`` where ``drop`` is set become the empty prompt's."""

    def one(field: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        return torch.where(drop.reshape(-1, *[1] * (field.ndim - 1)), empty.expand_as(field), field)

    return Conditioning(**{k: one(v, getattr(null, k)) for k, v in captions._tensors().items()})


class CaptionEmbeddings:
    """Encoded captions held in memory, one row per distinct caption, and the empty caption's."""

    def __init__(self, encoder: SentencePromptEncoder, captions: list[str], embed_batch: int = 256):
        chunks = [encoder.encode(captions[i : i + embed_batch]) for i in range(0, len(captions), embed_batch)]
        self.rows = Conditioning.cat(chunks)
        self.null = encoder.null(1)

    def take(self, index: torch.Tensor, drop: torch.Tensor) -> Conditioning:
        """The captions at ``index``, those where ``drop`` is set replaced by the empty one."""
        return drop_captions(self.rows[index], drop, self.null)


class CaptionTable:
    """Every training caption (10 classes × templates) and "", encoded once."""

    def __init__(self, encoder: SentencePromptEncoder, templates=train_caption_templates, num_classes: int = 10):
        self.captions = [[caption_for(c, tpl) for tpl in templates] for c in range(num_classes)]
        self.num_templates = len(templates)
        self.embeddings = CaptionEmbeddings(encoder, [cap for row in self.captions for cap in row])

    def embed(self, labels: torch.Tensor, template_idx: torch.Tensor, drop: torch.Tensor) -> Conditioning:
        return self.embeddings.take(labels * self.num_templates + template_idx, drop)


# ---- where the images and captions come from ------------------------------------------------------


class CaptionedImages(Protocol):
    """Training images (N, 1, 32, 32) in [-1, 1] with encoded captions, held in memory."""

    embedding_dim: int  # size of a pooled caption embedding
    config: dict  # what the run's config.json records about the source

    def __len__(self) -> int: ...

    def batch(self, g: torch.Generator, batch_size: int, caption_dropout: float) -> tuple[torch.Tensor, Conditioning]:
        """(x0, captions) of one step, every draw taken from ``g`` (so a function of the step's seed)."""
        ...


class FashionMnistIdx:
    """Fashion-MNIST's training split from its idx files; each draw pairs an image with a random
    training caption template of its label (label × template, embedded once in a ``CaptionTable``)."""

    def __init__(self, encoder: SentencePromptEncoder, idx_dir: str = FASHION_MNIST_IDX):
        images, labels = load_fashion_mnist(idx_dir, "train")
        self.x = torch.from_numpy(np.stack([pad_image(im) for im in images])).float().div(127.5).sub(1)[:, None]
        self.labels = torch.from_numpy(labels)
        self.captions = CaptionTable(encoder)
        self.embedding_dim = encoder.pooled_dim
        self.config: dict = {}  # the idx runs' config.json predates data sources: it stays as it was

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, g: torch.Generator, batch_size: int, caption_dropout: float) -> tuple[torch.Tensor, Conditioning]:
        # The order of the draws is the checkpoints' contract: changing it breaks exact resumption.
        idx = torch.randint(len(self.x), (batch_size,), generator=g)
        tpl = torch.randint(self.captions.num_templates, (batch_size,), generator=g)
        drop = torch.rand(batch_size, generator=g) < caption_dropout
        return self.x[idx], self.captions.embed(self.labels[idx], tpl, drop)


class ShardCaptions:
    """Image-caption Parquet shards (``addctl prepare-data``) decoded into memory: each image with the
    caption it was written with, every distinct caption embedded once. Fine for Fashion-MNIST-sized
    sets (60k images at 32×32 are 250 MB); records whose image does not decode or that have no
    caption are left out and counted in ``config["skipped"]``."""

    def __init__(
        self,
        encoder: SentencePromptEncoder,
        uri: str,
        storage: StorageOptions | None = None,
        resolution: int = 32,
        embed_batch: int = 256,
    ):
        import pyarrow.parquet as pq

        from workers.data.ingest import decode_image, list_shards

        fs, root = resolve(uri, storage)
        images, index, labels, skipped = [], [], [], 0
        position: dict[str, int] = {}  # distinct caption -> its row in the embedding table
        for name in list_shards(uri, "parquet", storage):
            table = pq.read_table(fs.open_input_file(posixpath.join(root, name) if name else root))
            column = {c: table.column(c).to_pylist() for c in ("image", "caption", "label") if c in table.column_names}
            for i, (data, caption) in enumerate(zip(column["image"], column["caption"], strict=True)):
                try:
                    image = decode_image(data, resolution, 1, min_side=1) if caption else None
                except (ValueError, TypeError):
                    image = None
                if image is None:
                    skipped += 1
                    continue
                images.append(image)
                index.append(position.setdefault(caption, len(position)))
                label = column["label"][i] if "label" in column else None
                labels.append(-1 if label is None else int(label))
        if not images:
            raise ValueError(f"{display_uri(uri)}: no record with a decodable image and a caption")
        self.captions = list(position)
        self.x = torch.from_numpy(np.stack(images))
        self.caption_idx = torch.tensor(index)
        self.labels = torch.tensor(labels)  # -1 where the shards hold none
        self.embeddings = CaptionEmbeddings(encoder, self.captions, embed_batch)
        self.embedding_dim = encoder.pooled_dim
        self.config = {"data": display_uri(uri), "images": len(images), "captions": len(position), "skipped": skipped}

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, g: torch.Generator, batch_size: int, caption_dropout: float) -> tuple[torch.Tensor, Conditioning]:
        idx = torch.randint(len(self.x), (batch_size,), generator=g)
        drop = torch.rand(batch_size, generator=g) < caption_dropout
        return self.x[idx], self.embeddings.take(self.caption_idx[idx], drop)


def _save_checkpoint(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def train(
    out: Path,
    steps: int,
    batch_size: int = 128,
    lr: float = 5e-4,
    warmup: int = 200,
    ema_decay: float = 0.999,
    caption_dropout: float = 0.1,
    checkpoint_every: int = 100,
    seed: int = 0,
    idx_dir: str = FASHION_MNIST_IDX,
    bf16: bool = True,
    data: CaptionedImages | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    network: TeacherNetworkSpec | None = None,
) -> dict:
    """Train (or resume) to ``steps``; returns the final metrics. Checkpoint: out/checkpoint.pt.

    ``network`` defaults to the benchmark's UNet; ``data`` to ``FashionMnistIdx`` over ``idx_dir``,
    its captions encoded as the network reads them (``minilm_encoder``). ``on_checkpoint`` is called
    with each new entry of the history (step, mean loss since the last checkpoint, s/step) once it is
    saved. A run folder resumes only with the network it was started with.
    """
    out.mkdir(parents=True, exist_ok=True)
    network = network or TeacherNetworkSpec()
    arch = teacher_network(network)
    data = data if data is not None else FashionMnistIdx(minilm_encoder(arch.text_tokens), idx_dir)
    schedule = arch.schedule()
    torch.manual_seed(seed)  # the initial weights too are a function of the seed
    model = arch.build(data.embedding_dim)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    step, history = 0, []
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        started_with = network_of(state["config"])
        if started_with != network:
            raise ValueError(
                f"{out} holds a run of the {started_with.architecture} network {started_with.model_dump()}, not of "
                f"{network.model_dump()}: resuming would not fit its weights; give another run folder"
            )
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, history = state["step"], state["history"]
        print(f"resumed from step {step}", flush=True)
    config = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "ema_decay": ema_decay,
        "caption_dropout": caption_dropout,
        "seed": seed,
        "bf16": bf16,
        "scheduler": dict(arch.scheduler().config),
        "network": network.model_dump(),
        "parameters": sum(p.numel() for p in model.parameters()),
        **data.config,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    bar = tqdm(total=steps, initial=step, desc="teacher", mininterval=30)
    start, losses = time.perf_counter(), []
    while step < steps:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)  # the step's randomness: f(seed, step)
        x0, captions = data.batch(g, batch_size, caption_dropout)
        t = arch.draw_t(g, batch_size, schedule)
        eps = torch.randn(x0.shape, generator=g)
        x_t = schedule.add_noise(x0, eps, t)
        target = schedule.from_x0(x0, x_t, t)  # v for the UNet, the velocity ε − x0 for the MMDiT
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = arch.predict(model, x_t, t, schedule, arch.conditioning(captions))
        loss = (pred.float() - target).square().mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; last checkpoint kept")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - ema_decay)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % checkpoint_every == 0 or step == steps:
            elapsed = time.perf_counter() - start
            history.append({"step": step, "loss": float(np.mean(losses)), "s_per_step": elapsed / len(losses)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            _save_checkpoint(
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "step": step,
                    "history": history,
                    "config": config,
                },
                ckpt_path,
            )
            (out / "history.json").write_text(json.dumps(history, indent=1))
            if on_checkpoint is not None:
                on_checkpoint(history[-1])
            start, losses = time.perf_counter(), []
    bar.close()
    return history[-1] if history else {}


def minilm_encoder(text_tokens: int | None = None) -> SentencePromptEncoder:
    """all-MiniLM-L6-v2 read the sentence-transformers way (mean-pooled, normalised); with
    ``text_tokens``, also its token states padded to that many (what the MMDiT's text stream reads)."""
    path = package_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, **({"model_max_length": text_tokens} if text_tokens else {}))
    return SentencePromptEncoder(
        tokenizer, AutoModel.from_pretrained(path), as_class_labels=text_tokens is None, with_tokens=bool(text_tokens)
    )


def export(out: Path, folder: Path, weights: str = "ema") -> Path:
    """Write the teacher as a diffusers folder: unet/ (or transformer/), scheduler/, and
    text_encoder.json naming the package that carries the text encoder (too large to ship) and, for
    a network that reads tokens, how many it pads the caption to.

    ``weights``: "ema" (the exponential moving average) or "model" (the trained weights). The EMA
    starts from the initial weights without warm-up, so after t steps it still holds 0.999^t of
    them (41% at step 900): a short run exports its trained weights instead.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    arch = teacher_network(network_of(state["config"]))
    model = arch.build(AutoConfig.from_pretrained(package_model_path()).hidden_size)  # the caption embedding's size
    model.load_state_dict(state[weights])
    record = {"config": state["config"], "history": state["history"], "step": state["step"], "weights": weights}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / arch.folder)
        arch.scheduler().save_pretrained(tmp / "scheduler")
        text_encoder = {"package": MINILM_PACKAGE, "subfolder": "model"}
        if arch.text_tokens:
            text_encoder["max_length"] = arch.text_tokens
        (tmp / "text_encoder.json").write_text(json.dumps(text_encoder, indent=2))
        (tmp / "training.json").write_text(json.dumps(record, indent=1))

    atomic_write(folder, write)
    return folder
