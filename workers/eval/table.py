"""The benchmark table for one distilled student: the evaluator behind ``eval.table`` in a job.

Teacher rows do not depend on the student: they are measured once with the full protocol and
shipped beside the teacher (``TeacherRows``, keyed by the teacher's fingerprint and the protocol),
and measured here only when no such file is given. Student rows are measured here, and the
reference sampler (the teacher at 50 steps with CFG) is re-timed in this process at the same batch
size, so every speed-up of a student row is a same-process ratio.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from workers.add.components import load_teacher
from workers.add.export import load_student
from workers.add.student import Student
from workers.add.teacher import Teacher
from workers.data.storage import atomic_write
from workers.eval.alignment import PromptScorer
from workers.eval.config import EvalSpec
from workers.eval.features import FeatureExtractor
from workers.eval.images import student_images, teacher_images
from workers.eval.progress import RowProgress
from workers.eval.protocol import Generate, Protocol, Row, with_speedups
from workers.eval.report import fid_vs_nfe, sample_grid, table_markdown
from workers.eval.samplers import Sampler

# column titles of samples.png
SHORT_NAMES = {"ddim": "DDIM", "dpmpp": "DPM++", "euler": "Euler", "flow-dpmpp": "flow DPM++", "add": "ADD"}


class StaleTeacherRows(RuntimeError):
    """The shipped teacher rows were measured for another teacher or another protocol."""


def teacher_fingerprint(source: str | Path) -> str | None:
    """sha256 of a local teacher folder's weights and configs (``None`` for a hub id)."""
    root = Path(source)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")):
        if path.name == "teacher_rows.json":
            continue
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def protocol_key(config: EvalSpec) -> dict:
    """What must match for shipped teacher rows to compare with rows measured now: the protocol and
    the names of the feature network, the scorer and the reference images."""
    t = config.table
    return {
        "prompts": list(map(str, config.prompts)),
        "num_images": t.num_images,
        "seed": config.seed,
        "k": t.k,
        "guidance_scale": config.guidance_scale,
        "features": config.features,
        "scorer": config.scorer,
        "reference": t.reference_uri,
        "reference_images": t.reference_images,
    }


@dataclass
class TableResult:
    """Gate metrics, all rows, and the files a person looks at (name -> PIL image or text)."""

    metrics: dict[str, float]
    rows: list[Row]
    artifacts: dict[str, object]
    config: EvalSpec | None = None  # the eval section as measured (the teacher's defaults filled in)

    def comparison_grid(self) -> Image.Image:
        return self.artifacts["samples.png"]

    def write(self, folder: str | Path) -> Path:
        """Every artifact into ``folder`` (each written to a temporary name, then moved into place)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, value in self.artifacts.items():
            if isinstance(value, Image.Image):
                atomic_write(folder / name, lambda tmp, image=value: image.save(tmp, format="PNG"))
            else:
                atomic_write(folder / name, lambda tmp, text=value: tmp.write_text(text))
        return folder


def save_teacher_rows(path: str | Path, rows: Sequence[Row], fingerprint: str | None, key: dict) -> Path:
    body = {"teacher_fingerprint": fingerprint, "protocol": key, "rows": [r.to_dict() for r in rows]}
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(body, indent=1)))


def load_teacher_rows(path: str | Path, fingerprint: str | None, key: dict) -> list[Row]:
    """The shipped rows, or ``StaleTeacherRows`` naming what differs and how to measure them again."""
    path = Path(path)
    redo = f"measure them again: addctl teacher rows JOB.yaml (writes {path})"
    if not path.is_file():
        raise StaleTeacherRows(f"no teacher rows at {path}; {redo}")
    body = json.loads(path.read_text())
    if fingerprint is not None and body.get("teacher_fingerprint") != fingerprint:
        raise StaleTeacherRows(f"{path} was measured for another teacher (its weights changed); {redo}")
    shipped = body.get("protocol", {})
    differ = sorted(k for k in set(shipped) | set(key) if shipped.get(k) != key.get(k))
    if differ:
        raise StaleTeacherRows(f"{path} was measured with another protocol ({', '.join(differ)} differ); {redo}")
    return [Row.from_dict(d) for d in body["rows"]]


class TableEvaluator:
    """Evaluates an exported student into the benchmark table; injected ``features``, ``scorer``
    and real ``reference`` images (N, C, H, W) in [0, 1].

    ``config`` is the job's ``eval`` section with its ``table`` (``eval.table.reference_uri`` filled
    in: it names the reference images in the protocol key). The gates read the student row at
    ``eval.student_steps`` and the teacher row ``eval.teacher_solver:eval.teacher_steps``; every
    teacher row samples with ``eval.guidance_scale``."""

    needs_reference = False  # the reference images are given here, not read by the controller

    def __init__(self, config: EvalSpec, features: FeatureExtractor, scorer: PromptScorer | None, reference: Tensor):
        self.given = config  # as the job wrote it; ``for_teacher`` fills in the teacher's own defaults
        self.config, self.table, self.features, self.scorer = config, config.table, features, scorer
        self.protocol = Protocol(config, features, scorer, reference)
        self._reference_speed: dict[str, tuple[float, dict]] = {}  # per teacher: timed once per evaluator
        self._measured_rows: dict[str, list[Row]] = {}

    def for_teacher(self, teacher: Teacher) -> TableEvaluator:
        """Measure for this teacher: its own solvers where the job left the teacher rows, the reference
        row or ``eval.teacher_solver`` unset (Euler for a flow-matching teacher, DDIM otherwise)."""
        self.config = self.given.for_teacher(teacher.schedule.is_flow)
        self.table = self.config.table
        return self

    # -- the generators of each row ---------------------------------------------------------------

    @staticmethod
    def teacher_generator(teacher: Teacher, sampler: Sampler) -> Generate:
        def generate(prompts: list, generator: torch.Generator) -> Tensor:
            return teacher_images(teacher, prompts, sampler.steps, sampler.guidance_scale, sampler.solver, generator)

        return generate

    @staticmethod
    def student_generator(student: Student, parts: Teacher, steps: int) -> Generate:
        def generate(prompts: list, generator: torch.Generator) -> Tensor:
            return student_images(student, parts, prompts, steps, generator)

        return generate

    # -- rows -------------------------------------------------------------------------------------

    def teacher_rows(self, teacher: Teacher, progress: RowProgress | None = None) -> list[Row]:
        """Every teacher row, measured with the full protocol (speed-ups against this set's reference);
        with ``progress``, a killed measurement resumes where it stopped."""
        self.for_teacher(teacher)
        rows = [self.protocol.measure(s, self.teacher_generator(teacher, s), progress) for s in self.samplers()]
        return self.teacher_speedups(rows)

    def samplers(self) -> list[Sampler]:
        """The teacher rows' samplers, all with the eval section's guidance scale."""
        return [Sampler.parse(s, self.config.guidance_scale) for s in self.table.teacher_samplers]

    def teacher_speedups(self, rows: Sequence[Row]) -> list[Row]:
        """Fill each teacher row's speed-up against the reference row among them."""
        return with_speedups(rows, self._row(rows, self.table.reference_sampler, "teacher").ms_per_image)

    def student_rows(self, student: Student, parts: Teacher) -> list[Row]:
        return [
            self.protocol.measure(Sampler("student", "add", n), self.student_generator(student, parts, n))
            for n in self.table.student_steps
        ]

    def _row(self, rows: Sequence[Row], text: str, model: str) -> Row:
        sampler = Sampler.parse(text, self.config.guidance_scale) if model == "teacher" else None
        for row in rows:
            if row.sampler == sampler or (
                model == "student" and row.sampler.model == "student" and row.sampler.steps == int(text)
            ):
                return row
        raise ValueError(f"the table has no {model} row {text!r}")

    # -- the evaluator interface of the controller -------------------------------------------------

    def evaluate_paths(self, student_path, teacher_source, config=None, reference=None, **teacher_kwargs):
        student, parts = load_student(student_path)
        teacher = load_teacher(str(teacher_source), **teacher_kwargs)
        return self.evaluate(student, parts, teacher, teacher_source)

    @torch.no_grad()
    def evaluate(self, student: Student, parts: Teacher, teacher: Teacher, teacher_source) -> TableResult:
        cfg, t = self.for_teacher(teacher).config, self.table
        key = str(teacher_source)  # what a sweep's evaluator measures once per teacher
        if t.teacher_rows:
            teacher_rows = load_teacher_rows(t.teacher_rows, teacher_fingerprint(teacher_source), protocol_key(cfg))
        else:  # measured here, once per evaluator and teacher (a sweep evaluates many students)
            if key not in self._measured_rows:
                self._measured_rows[key] = self.teacher_rows(teacher)
            teacher_rows = copy.deepcopy(self._measured_rows[key])
        reference = Sampler.parse(t.reference_sampler, cfg.guidance_scale)
        if key not in self._reference_speed:  # a sweep evaluating every trial times its teacher once
            generate = self.teacher_generator(teacher, reference)
            self._reference_speed[key] = self.protocol.speed(generate, label=reference.key)
        ref_ms, ref_timing = self._reference_speed[key]
        student_rows = with_speedups(self.student_rows(student, parts), ref_ms)
        for row in teacher_rows:  # speed-ups against this process's reference timing
            if row.sampler == reference:
                row.ms_per_image, row.timing = ref_ms, ref_timing | {"timed": "in this process"}
            row.speedup = ref_ms / row.ms_per_image
        rows = teacher_rows + student_rows

        gated_student = self._row(rows, str(cfg.student_steps), "student")
        gated_teacher = self._row(rows, f"{cfg.teacher_solver}:{cfg.teacher_steps}", "teacher")
        metrics = {
            "student_fid": gated_student.fid,
            "teacher_fid": gated_teacher.fid,
            "fid_ratio": gated_student.fid / max(gated_teacher.fid, 1e-12),
            "student_alignment": gated_student.alignment,
            "teacher_alignment": gated_teacher.alignment,
            "student_recall": gated_student.recall,
            "teacher_recall": gated_teacher.recall,
            "recall_ratio": gated_student.recall / max(gated_teacher.recall, 1e-12),
            "student_ms_per_image": gated_student.ms_per_image,
            "teacher_ms_per_image": ref_ms,
            "speedup": ref_ms / gated_student.ms_per_image,
            "num_images": float(t.num_images),
        }
        for row in rows:
            for name in ("fid", "alignment", "recall", "ms_per_image"):
                metrics[f"table/{row.sampler.key}/{name}"] = float(getattr(row, name))

        prompts = list(t.grid_prompts) or list(cfg.prompts)[:10]
        columns = {}
        for row in rows:
            s = row.sampler
            generate = (
                self.teacher_generator(teacher, s) if s.model == "teacher"
                else self.student_generator(student, parts, s.steps)
            )  # fmt: skip
            columns[f"{SHORT_NAMES[s.solver]} {s.steps}"] = generate(prompts, torch.Generator().manual_seed(cfg.seed))
        markdown = table_markdown(rows, t.alignment_name)
        body = {
            "protocol": protocol_key(cfg) | {"batch_size": t.batch_size},
            "reference": t.reference_sampler,
            "teacher_rows": t.teacher_rows,
            "metrics": metrics,
            "rows": [r.to_dict() for r in rows],
        }
        artifacts = {
            "table.md": markdown,
            "table.json": json.dumps(body, indent=1),
            "samples.png": sample_grid(columns, [str(p) for p in prompts]),
            "fid_vs_nfe.png": fid_vs_nfe(rows),
        }
        return TableResult(metrics, rows, artifacts, cfg)
