"""Measure the teacher's rows of the benchmark table once, and ship them beside the teacher.

The teacher's rows do not depend on the student, so a job reads them from ``eval.table.teacher_rows``
instead of sampling the teacher 130 steps deep for every student. They are keyed by the teacher's
fingerprint (its weights and configs) and the protocol (prompts, image count, seed, k, guidance,
features, scorer, reference): a job whose teacher or protocol differs refuses them and names this
command.

    addctl teacher rows jobs/fashion-mnist.yaml            # writes eval.table.teacher_rows
    addctl teacher rows jobs/fashion-mnist.yaml --set eval.table.num_images=1000

The full protocol takes hours on a CPU, so finished rows and the finished batches of the row being
measured are kept in a progress folder (``--progress``, default ``runs/teacher-rows/<job name>``):
run the same command again after a kill and it goes on where it stopped. ``--retime`` times the rows
of an existing file again on a quiet machine (their images and scores stay), for rows whose
generation shared the CPU with other work.
"""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator.controller import default_evaluator


def default_progress(spec) -> Path:
    return Path("runs") / "teacher-rows" / spec.name


def measure_teacher_rows(spec, out: str | Path | None = None, progress: str | Path | None = None) -> Path:
    """Sample, score and time every teacher row of the job's table; write them (atomically) to ``out``
    (default ``eval.table.teacher_rows``) with a Markdown table beside them. Rows and batches finished
    so far are kept under ``progress`` (default ``default_progress(spec)``), so a killed run resumes."""
    from workers.eval.progress import RowProgress
    from workers.eval.table import save_teacher_rows

    table = spec.eval.table
    if table is None:
        raise ValueError("the job has no eval.table section: nothing to measure")
    out = Path(out or table.teacher_rows or "teacher_rows.json")
    evaluator, teacher, fingerprint, key = _measuring(spec)
    # kept batches are numbered in generation calls: a folder of another batch size is stale
    batches = {"generation_batch_size": evaluator.protocol.generation_size}
    kept = RowProgress(progress or default_progress(spec), {"teacher_fingerprint": fingerprint} | key | batches)
    started = time.monotonic()
    rows = evaluator.teacher_rows(teacher, kept)
    save_teacher_rows(out, rows, fingerprint, key)
    _write_markdown(out, rows, evaluator, spec, f"measured by `addctl teacher rows` "
                    f"({time.monotonic() - started:.0f} s in its last run)")
    return out


def retime_teacher_rows(spec, path: str | Path | None = None) -> Path:
    """Time every row of an existing teacher-rows file again (warm-up, then the median of
    ``speed_repeats`` calls at the protocol's batch size); images and scores are not touched."""
    from workers.eval.table import load_teacher_rows, save_teacher_rows

    table = spec.eval.table
    if path is None and (table is None or table.teacher_rows is None):
        raise ValueError("no teacher rows to re-time: give --out or set eval.table.teacher_rows")
    path = Path(path or table.teacher_rows)
    evaluator, teacher, fingerprint, key = _measuring(spec)
    rows = load_teacher_rows(path, fingerprint, key)
    for row in rows:
        row.ms_per_image, timing = evaluator.protocol.speed(evaluator.teacher_generator(teacher, row.sampler))
        row.timing = timing | {"timed": "by --retime"}
    rows = evaluator.teacher_speedups(rows)
    save_teacher_rows(path, rows, fingerprint, key)
    _write_markdown(path, rows, evaluator, spec, "measured by `addctl teacher rows`, re-timed by its `--retime`")
    return path


def _measuring(spec):
    """The job's table evaluator, its teacher, the teacher's fingerprint and the protocol key."""
    from workers.add.components import load_teacher
    from workers.eval.table import protocol_key, teacher_fingerprint

    evaluator = default_evaluator(spec)
    teacher = load_teacher(spec.teacher.source, **spec.teacher.load_kwargs())
    evaluator.for_teacher(teacher)  # the teacher's own solvers where the job left them unset
    return evaluator, teacher, teacher_fingerprint(spec.teacher.source), protocol_key(evaluator.config)


def _write_markdown(out: Path, rows, evaluator, spec, how: str) -> None:
    from workers.eval.report import table_markdown

    markdown = table_markdown(rows, evaluator.table.alignment_name)
    n = evaluator.table.num_images
    heading = f"Teacher rows of {spec.teacher.source}: {n} images per row, {how}."
    out.with_suffix(".md").write_text(f"{heading}\n\n{markdown}")
