"""The benchmark's outputs: the table as Markdown and JSON, FID against NFE, and the sample grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image
from torch import Tensor

from workers.eval.images import to_uint8
from workers.eval.protocol import Row


def _num(value: float | None, digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table_markdown(rows: Sequence[Row], alignment_name: str = "class acc") -> str:
    """The table of ``../shared/BENCHMARK.md``, one row per sampler, in the order given."""
    lines = [
        f"| sampler | steps | NFE | FID | {alignment_name} | precision | recall | ms/image | images/s | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = "–" if r.speedup is None else f"{r.speedup:.1f}×"
        lines.append(
            f"| {r.sampler.family} | {r.sampler.steps} | {r.sampler.nfe} | {_num(r.fid, 2)} | {_num(r.alignment, 3)} "
            f"| {_num(r.precision, 3)} | {_num(r.recall, 3)} | {_num(r.ms_per_image, 2)} | {_num(r.images_per_s, 1)} "
            f"| {speedup} |"
        )
    return "\n".join(lines) + "\n"


def fid_vs_nfe(rows: Sequence[Row], title: str = "FID against network evaluations") -> Image.Image:
    """One line per sampler family, NFE on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    families: dict[str, list[Row]] = {}
    for r in rows:
        families.setdefault(r.sampler.family, []).append(r)
    for family, group in families.items():
        group = sorted(group, key=lambda r: r.sampler.nfe)
        ax.plot([r.sampler.nfe for r in group], [r.fid for r in group], marker="o", label=family)
        for r in group:
            ax.annotate(str(r.sampler.steps), (r.sampler.nfe, r.fid), textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE per image (labels: steps)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return image


def sample_grid(columns: dict[str, Tensor], prompts: Sequence[str], scale: int = 2) -> Image.Image:
    """Rows: prompts; columns: samplers (``{label: images (P, C, H, W) in [0, 1]}``, row i from prompt i)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(columns)
    n_rows, n_cols = len(prompts), len(labels)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(1.0 * scale * n_cols / 2 + 2.5, 1.0 * scale * n_rows / 2 + 0.6), dpi=100,
        squeeze=False,
    )
    for j, label in enumerate(labels):
        images = to_uint8(columns[label])
        for i in range(n_rows):
            ax = axes[i][j]
            image = images[i]
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=7)
            if j == 0:
                ax.set_ylabel(prompts[i], fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.3)
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return image
