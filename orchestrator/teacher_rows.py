"""Measure the teacher's rows of the benchmark table once, and ship them beside the teacher.

The teacher's rows do not depend on the student, so a job reads them from ``eval.table.teacher_rows``
instead of sampling the teacher 130 steps deep for every student. They are keyed by the teacher's
fingerprint (its weights and configs) and the protocol (prompts, image count, seed, k, guidance,
features, scorer, reference): a job whose teacher or protocol differs refuses them and names this
command.

    python -m orchestrator.teacher_rows jobs/fashion-mnist.yaml            # writes eval.table.teacher_rows
    python -m orchestrator.teacher_rows jobs/fashion-mnist.yaml --set eval.table.num_images=1000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from orchestrator.controller import default_evaluator
from orchestrator.spec import load_job


def measure_teacher_rows(spec, out: str | Path | None = None) -> Path:
    """Sample, score and time every teacher row of the job's table; write them (atomically) to ``out``
    (default ``eval.table.teacher_rows``) with a Markdown table beside them."""
    from workers.add.components import load_teacher
    from workers.eval.report import table_markdown
    from workers.eval.table import save_teacher_rows, teacher_fingerprint

    table = spec.eval.table
    if table is None:
        raise ValueError("the job has no eval.table section: nothing to measure")
    out = Path(out or table.teacher_rows or "teacher_rows.json")
    evaluator = default_evaluator(spec)
    teacher = load_teacher(spec.teacher.source, prediction_type=spec.teacher.prediction_type)
    started = time.monotonic()
    rows = evaluator.teacher_rows(teacher)
    key = evaluator.config.protocol_key()
    save_teacher_rows(out, rows, teacher_fingerprint(spec.teacher.source), key)
    markdown = table_markdown(rows, evaluator.config.alignment_name)
    out.with_suffix(".md").write_text(
        f"Teacher rows of {spec.teacher.source}: {key['num_images']} images per row, measured in "
        f"{time.monotonic() - started:.0f} s by `python -m orchestrator.teacher_rows`.\n\n{markdown}"
    )
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", help="the job file whose eval.table protocol the rows are measured with")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="where to write the rows (default: eval.table.teacher_rows)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    spec = load_job(args.job, args.overrides)
    path = measure_teacher_rows(spec, args.out)
    print(path.with_suffix(".md").read_text())
    print(json.dumps({"written": str(path)}))


if __name__ == "__main__":
    main()
