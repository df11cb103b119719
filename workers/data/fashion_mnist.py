"""Fashion-MNIST as an image-caption set: idx files, class names and caption templates.

Captions come from per-class templates. ``eval_caption_templates`` are never used for training:
the benchmark measures prompt alignment on phrasings the models never saw (BENCHMARK.md).
"""

from __future__ import annotations

import gzip
import io
import os

import numpy as np
from PIL import Image

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_IDX",
    "FASHION_MNIST_NOUNS",
    "caption_for",
    "eval_caption_templates",
    "eval_prompts",
    "find_idx_files",
    "load_fashion_mnist",
    "pad_image",
    "png_bytes",
    "read_idx",
    "train_caption_templates",
]

# Where the Debian package dataset-fashion-mnist installs the idx files (`make demo` installs it).
FASHION_MNIST_IDX = "/usr/share/datasets/fashion-mnist"

# The dataset's own class names; the index is the label.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# The same classes as noun phrases with their article, as they read inside a caption.
FASHION_MNIST_NOUNS: tuple[str, ...] = (
    "a t-shirt",
    "a pair of trousers",
    "a pullover",
    "a dress",
    "a coat",
    "a sandal",
    "a shirt",
    "a sneaker",
    "a bag",
    "an ankle boot",
)

# "{}" is replaced by the noun phrase ("a sneaker", "an ankle boot").
train_caption_templates: tuple[str, ...] = (
    "{}",
    "a photo of {}",
    "a black and white picture of {}",
    "a picture of {}",
    "an image of {}",
    "a grayscale photo of {}",
    "a small photo of {}",
    "a product photo of {}",
)

# Held out: used only for evaluation prompts.
eval_caption_templates: tuple[str, ...] = (
    "a low resolution photo of {}",
    "a catalogue image showing {}",
    "a monochrome snapshot of {}",
)

# idx magic numbers: 0x0000 08 <ndim> for unsigned bytes.
_IDX_UBYTE = 0x08

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def caption_for(label: int, template: str) -> str:
    """The caption for class ``label`` written with ``template``."""
    return template.format(FASHION_MNIST_NOUNS[label])


def eval_prompts() -> list[tuple[str, int]]:
    """Every held-out (caption, label) pair, class-major: the evaluation prompt set."""
    return [(caption_for(c, t), c) for c in range(len(FASHION_MNIST_NOUNS)) for t in eval_caption_templates]


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (optionally gzipped) of unsigned bytes into an array of its shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise ValueError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: idx header says {shape} but holds {body.size} values (truncated?)")
    return body.reshape(shape)


def find_idx_files(idx_dir: str, split: str) -> tuple[str, str]:
    """Paths of the images and labels idx files of ``split`` ("train" or "test"), gzipped or not."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    prefix = _SPLIT_PREFIX[split]
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [os.path.join(idx_dir, f"{prefix}-{kind}{ext}") for ext in ("", ".gz")]
        path = next((c for c in candidates if os.path.exists(c)), None)
        if path is None:
            raise FileNotFoundError(f"{idx_dir}: no {prefix}-{kind}[.gz] (Fashion-MNIST idx files)")
        found.append(path)
    return found[0], found[1]


def load_fashion_mnist(idx_dir: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split."""
    images_path, labels_path = find_idx_files(idx_dir, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{idx_dir}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)


def pad_image(image: np.ndarray, size: int = 32) -> np.ndarray:
    """Zero-pad an (H, W) image symmetrically to (size, size): 28 -> 32 for Fashion-MNIST."""
    h, w = image.shape
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(image, ((top, size - h - top), (left, size - w - left)))


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a grayscale (H, W) uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
