"""The benchmark's evaluator network: a small Fashion-MNIST classifier, trained by the project.

Its penultimate layer is the feature space of FID and recall, its predictions give class accuracy
(the analogue of CLIP score). It sees only the evaluation; the discriminator never uses it.

Example (a few minutes on 2 CPU cores):
    addctl evaluator train --out jobs/fashion-mnist/evaluator
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from workers.data.fashion_mnist import FASHION_MNIST_IDX, load_fashion_mnist, pad_image
from workers.data.storage import atomic_write

WEIGHTS, INFO = "classifier.safetensors", "classifier.json"


class FashionClassifier(nn.Module):
    """Conv net on 32×32 grayscale images in [-1, 1]; ``features`` is its 128-d penultimate layer."""

    feature_dim = 128

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(1, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, num_classes))

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def load_split(idx_dir: str, split: str) -> tuple[Tensor, Tensor]:
    """Padded 32×32 images in [-1, 1] (N, 1, 32, 32) and labels."""
    images, labels = load_fashion_mnist(idx_dir, split)
    x = torch.from_numpy(np.stack([pad_image(im) for im in images])).float().div(127.5).sub(1)[:, None]
    return x, torch.from_numpy(labels)


@torch.no_grad()
def predict(model: FashionClassifier, x: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """(features, logits) of images in [-1, 1], in eval mode."""
    model.eval()
    feats = [model.features(chunk) for chunk in x.split(batch_size)]
    f = torch.cat(feats)
    return f, model.head(f)


def train(
    out: Path, epochs: int = 4, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, idx_dir: str = FASHION_MNIST_IDX
) -> dict:
    """Train on the train split, report test accuracy, save weights and info atomically."""
    torch.manual_seed(seed)
    x, y = load_split(idx_dir, "train")
    x_test, y_test = load_split(idx_dir, "test")
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc="classifier", mininterval=10)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb = x[idx]
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()  # small translations
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    _, logits = predict(model, x_test)
    accuracy = float((logits.argmax(1) == y_test).float().mean())
    info = {
        "test_accuracy": accuracy,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(model.state_dict(), str(tmp)))
    (out / INFO).write_text(json.dumps(info, indent=2))
    return info


def load_classifier(folder: str | Path) -> FashionClassifier:
    """The shipped classifier, in eval mode and frozen."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"no evaluator classifier at {path}: train it with addctl evaluator train"
        )
    model = FashionClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
