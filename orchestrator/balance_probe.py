"""``addctl balance-probe``: a job's ADD step run in this process (no Ray, no MLflow) for a few hundred
steps, to compare settings of the two losses' balance cheaply before spending a whole run on one.

Every ``train.log_every`` steps it prints the heads' hinge loss against its chance value, their mean
real/fake AUC, λ_adv and the two gradients' ratio and cosine at x̂θ and at θ, and the heads' AUC per
student timestep s on two held-out batches (``timestep_separability``: a fake made at a small s is
nearly its real image, so the batch's mean AUC mixes fakes the heads can tell apart with fakes they
cannot); ``freeze_at`` is the control that trains the heads alone against the student of that step (0:
the initial student), ``fresh_heads`` with it restarts the heads there from their initial weights: whether
heads that chased the student, or any heads, can tell its samples from real.
At the end it scores the
student's 1- and 4-step samples of the job's eval prompts with the job's eval features and scorer
(FID, precision / recall, alignment) against ``eval.table.reference_uri``. It runs the update the
training loop runs (``student_step``, ``discriminator_step``, ``student_sample`` of ``workers.add.step``)
with the job's optimizers, clipping, EMA and heads' updates; batches are drawn at random
from the first ``pool`` rows of ``data.uri`` rather than streamed, so its figures compare settings
with each other, not with a full run's table.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from orchestrator.spec import JobSpec
from workers.add.step import discriminator_step, student_sample, student_step
from workers.data.ingest import decode_image, list_shards
from workers.data.storage import resolve
from workers.eval.frechet import FeatureStats, frechet_distance
from workers.eval.images import student_images
from workers.eval.manifold import precision_recall
from workers.eval.reference import reference_images
from workers.train.ema import EMA
from workers.train.models import build_models, build_objective, build_optimizers, make_batch, set_student_lr

SHOWN = (
    "loss/D",
    "heads/auc_mean",
    "lr/student",
    "balance/lambda_adv",
    "balance/ratio_x",
    "balance/ratio_theta",
    "balance/cos_theta",
)
HELD_OUT_BATCHES = 2


def timestep_separability(models, objective, held: list, seed: int = 0) -> dict[str, float]:
    """The heads' AUC and hinge loss on fakes made at each student timestep s from held-out real batches
    (the same noise every call), without updating anything: which fakes the heads can tell from real."""
    from workers.add.step import discriminator_loss

    student, out = models.student, {}
    for s in student.timesteps.tolist():
        aucs, losses = [], []
        for i, b in enumerate(held):
            g = torch.Generator().manual_seed(seed + i)
            s_batch = torch.full((b.x0.shape[0],), s, dtype=torch.long, device=b.x0.device)
            with torch.no_grad():
                x_s = student.schedule.add_noise(b.x0, torch.randn(b.x0.shape, generator=g).to(b.x0), s_batch)
                fake = student.denoise(x_s, s_batch, b.cond)
            _, m = discriminator_loss(models, objective, b, fake, 1, g)  # R1 off at step 1 unless every step
            aucs.append(m["heads/auc_mean"])
            losses.append(m["loss/D"])
        out[f"heads/auc s={s}"], out[f"loss/D s={s}"] = float(np.mean(aucs)), float(np.mean(losses))
    return out


def _rows(spec: JobSpec, pool: int) -> dict[str, list]:
    """The first ``pool`` rows (image bytes and captions) of the job's shards."""
    fs, root = resolve(spec.data.uri)
    images, captions = [], []
    for name in list_shards(spec.data.uri):
        with fs.open_input_file(f"{root}/{name}" if name else root) as f:
            table = pq.read_table(f, columns=["image", "caption"]).to_pydict()
        images += table["image"]
        captions += table["caption"]
        if len(images) >= pool:
            break
    return {"image": images[:pool], "caption": captions[:pool]}


def probe(
    spec: JobSpec,
    steps: int,
    pool: int = 20000,
    images: int = 1000,
    log=print,
    device: str = "cpu",
    data: dict[str, list] | None = None,
    reference: torch.Tensor | None = None,
    freeze_at: int | None = None,
    fresh_heads: bool = False,
) -> dict:
    """Train ``steps`` ADD steps in-process; the balance figures per report and the final scores.

    ``data`` (image bytes and captions) replaces the first ``pool`` rows of ``data.uri``, and
    ``reference`` the eval features of the reference images, where a caller has them already.
    ``freeze_at``: the control: from that step on θ is never updated, only the heads learn (as many updates
    per step); ``fresh_heads``: the heads (and their optimizer) restart there from their initial weights."""
    t, d = spec.train, spec.data
    torch.manual_seed(t.seed)
    device = torch.device(device)
    models, objective = build_models(spec, device), build_objective(spec)
    opt_g, opt_d = build_optimizers(spec, models)
    ema = EMA(models.student, t.ema_decay) if t.ema_decay else None
    heads = models.discriminator.heads
    initial_heads = (copy.deepcopy(heads.state_dict()), copy.deepcopy(opt_d.state_dict())) if fresh_heads else None
    data, rng = data or _rows(spec, pool), np.random.default_rng(t.seed)

    def batch(rng=rng):
        idx = rng.choice(len(data["image"]), t.batch_size, replace=False)
        pixels = np.stack([decode_image(data["image"][i], d.resolution, d.channels, 8) for i in idx])
        return make_batch(
            models.teacher, {"pixels": pixels, "caption": np.array([data["caption"][i] for i in idx])}, device
        )

    held = [batch(np.random.default_rng(10**6 + i)) for i in range(HELD_OUT_BATCHES)]
    reports, interval, started = [], [], time.time()
    for step in range(steps):
        frozen = freeze_at is not None and step >= freeze_at
        if initial_heads is not None and step == freeze_at:
            heads.load_state_dict(initial_heads[0])
            opt_d.load_state_dict(initial_heads[1])
        for update in range(1, t.discriminator_steps):  # the extra heads' updates, as the loop runs them
            b, g = batch(), torch.Generator().manual_seed(10**6 + 10 * step + update)
            discriminator_step(models, objective, b, student_sample(models, b, g), opt_d, step, g)
        b, g = batch(), torch.Generator().manual_seed(step)
        measure = (step + 1) % t.log_every == 0
        if frozen:
            metrics, fake = {}, student_sample(models, b, g)
        else:
            set_student_lr(spec, opt_g, step)
            metrics, fake = student_step(models, objective, b, opt_g, g, measure)
            metrics["lr/student"] = opt_g.param_groups[0]["lr"]
        metrics |= discriminator_step(models, objective, b, fake, opt_d, step, g)
        if ema is not None:
            ema.update(models.student)
        interval.append(metrics)
        if measure:
            shown = [k for k in SHOWN if any(k in m for m in interval)]
            report = {k: float(np.mean([m[k] for m in interval if k in m])) for k in shown} | {"step": step + 1}
            per_s = timestep_separability(models, objective, held)
            reports.append(report | per_s)
            interval = []
            aucs = " ".join(f"{k.split()[1]}:{v:.2f}" for k, v in per_s.items() if k.startswith("heads/auc"))
            log(f"step {step + 1:4d} {time.time() - started:5.0f}s " + "  ".join(f"{k}={report[k]:.3g}" for k in shown)
                + f"  held-out AUC by s: {aucs}")  # fmt: skip
    result = {"steps": steps, "train_s": time.time() - started, "reports": reports}
    late = [r for r in reports if r["step"] > steps // 2] or reports
    keys = dict.fromkeys(k for r in late for k in r if k != "step")  # a frozen student's reports lack θ's
    result |= {f"{k} (second half)": float(np.mean([r[k] for r in late if k in r])) for k in keys}
    return result | _scores(spec, models, ema, images, reference)


def reference_features(spec: JobSpec, features) -> torch.Tensor:
    """The eval features of the job's reference images (``eval.table.reference_uri``, else ``data.uri``)."""
    e = spec.eval
    reference_uri = e.table.reference_uri if e.table and e.table.reference_uri else spec.data.uri
    count = e.table.reference_images if e.table else 1000
    real = reference_images(reference_uri, count, spec.data.resolution, spec.data.channels)
    return torch.cat([features(real[i : i + 1000]) for i in range(0, len(real), 1000)])


@torch.no_grad()
def _scores(spec: JobSpec, models, ema, n: int, real_f: torch.Tensor | None = None) -> dict:
    """FID, precision / recall and alignment of the student's 1- and 4-step samples (EMA weights if kept)."""
    from orchestrator.controller import eval_instruments

    e = spec.eval
    prompts = [e.prompts[i % len(e.prompts)] for i in range(n)] if e.prompts else [""] * n
    features, scorer = eval_instruments(spec)
    if features is not None and real_f is None:
        real_f = reference_features(spec, features)
    out = {}
    weights = ema.swapped_in(models.student) if ema is not None else contextlib.nullcontext()
    with weights:
        for steps in (1, 4):
            generator = torch.Generator().manual_seed(e.seed)
            fake = torch.cat(
                [
                    student_images(models.student, models.teacher, prompts[i : i + 100], steps, generator)
                    for i in range(0, n, 100)
                ]
            ).cpu()  # the eval instruments run on the CPU
            if real_f is not None:
                fake_f = features(fake)
                pr = precision_recall(real_f, fake_f, k=3)
                out[f"fid {steps} step"] = frechet_distance(FeatureStats.of(fake_f), FeatureStats.of(real_f))
                out[f"precision {steps} step"], out[f"recall {steps} step"] = pr["precision"], pr["recall"]
            if scorer is not None:
                out[f"alignment {steps} step"] = float(scorer(fake, prompts).mean())
    return out


def write(result: dict, path: str | Path) -> None:
    """Append one probe's result as a JSON line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(result) + "\n")
