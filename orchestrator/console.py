"""What ``addctl run`` shows a person: one progress bar per phase, the result, and where the run lives.

Everything else (Ray's and Ray Data's progress bars, each report's metrics as Ray Train prints them,
the workers' output and library warnings) goes to the run's log file, which the console names:

- ``Console`` moves this process's stdout and stderr into the log file at the level of the file
  descriptors, so the output Ray forwards from its workers, the processes Ray starts and C
  extensions follow; it keeps a copy of the terminal for the person. With ``verbose`` the log is
  copied to the terminal as well.
- ``TrainingProgress`` draws the training phase (one bar per training run: one, or a sweep's trials)
  from what the job logs to MLflow, the step and the losses of each report, so it reads the same
  for a local Ray and a cluster; the evaluation's rows draw their own bars on the terminal
  (``workers.console.progress_stream``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from workers.console import set_progress_stream

LOG_NAME = "run.log"
LOSSES = (("loss/student", "L_G"), ("loss/distill", "L_distill"), ("loss/D", "L_D"))


def log_path(storage_uri: str, name: str, home: Path) -> Path:
    """The run's log file: ``<storage>/<name>/run.log`` beside its checkpoints when storage is a local
    folder, else ``<home>/logs/<name>.log`` (object storage holds no appendable file); relative to the
    working directory when it is inside it."""
    from workers.data.storage import split_uri

    scheme, path = split_uri(storage_uri)
    log = Path(path, name, LOG_NAME) if scheme == "file" else Path(home, "logs", f"{name}.log").absolute()
    return log.relative_to(Path.cwd()) if log.is_relative_to(Path.cwd()) else log


class Console:
    """Within ``with Console(path) as console``: the process's stdout and stderr (file descriptors 1
    and 2) append to ``path``; ``console.out`` / ``console.err`` write to the terminal.

    Streams that are not a process's own (click's test runner) cannot be moved: then the console is
    those streams and the log holds only what is written to it with ``log``.
    """

    def __init__(self, path: Path, verbose: bool = False):
        self.path, self.verbose = Path(path), verbose
        self.out: TextIO = sys.stdout
        self.err: TextIO = sys.stderr
        self._saved: list[int] = []
        self._pump: threading.Thread | None = None

    def __enter__(self) -> Console:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.path, "ab", buffering=0)  # noqa: SIM115  (closed in __exit__)
        self.log(f"\n==== addctl run, {time.strftime('%Y-%m-%d %H:%M:%S %Z')} ====\n")
        try:
            fds = (sys.stdout.fileno(), sys.stderr.fileno())
        except (AttributeError, OSError, ValueError):
            fds = None
        if fds is None:
            return self
        sys.stdout.flush()
        sys.stderr.flush()
        self._fds = fds
        self._saved = [os.dup(fd) for fd in fds]
        self.out = open(os.dup(fds[0]), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
        self.err = open(os.dup(fds[1]), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
        if self.verbose:  # a pipe whose reader copies into the log and onto the terminal
            read, write = os.pipe()
            self._pump = threading.Thread(target=self._copy, args=(read, self.err.fileno()), daemon=True)
            self._pump.start()
            target = write
        else:
            target = self._log.fileno()
        for fd in fds:
            os.dup2(target, fd)
        if self.verbose:
            os.close(write)
        set_progress_stream(self.err)
        return self

    def _copy(self, read: int, terminal: int) -> None:
        while chunk := os.read(read, 1 << 16):
            self._log.write(chunk)
            os.write(terminal, chunk)
        os.close(read)

    def __exit__(self, *exc) -> None:
        set_progress_stream(None)
        if self._saved:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, saved in zip(self._fds, self._saved, strict=True):
                os.dup2(saved, fd)  # the pipe's last writer (ours) closes here: the pump reads to its end
                os.close(saved)
            if self._pump is not None:
                self._pump.join(timeout=5)  # a process Ray started may still hold the pipe: not waited for
            for stream in (self.out, self.err):
                stream.close()
            self.out, self.err = sys.stdout, sys.stderr
        self._log.close()

    def log(self, text: str) -> None:
        """Write ``text`` to the log file only."""
        self._log.write(text.encode("utf-8", "replace"))

    def say(self, text: str, err: bool = True, **style) -> None:
        """A line on the terminal (stderr unless ``err=False``), also written to the log."""
        import click

        click.secho(text, file=self.err if err else self.out, **style)
        if self._saved:
            self.log(text + "\n")


class TrainingProgress:
    """The training phase on the console: a bar per training run of a job, from MLflow.

    ``start(parent_run_id)`` polls the parent's child runs every ``interval_s`` on a thread: each
    child gets a bar (``train.steps`` long) that follows the ``step`` metric of its reports, with
    the losses of the latest report; it ends when the run tags ``train.status``. ``stop()`` polls
    once more and closes every bar (before the evaluation draws its own).
    """

    def __init__(self, tracking_uri: str, stream: TextIO, interval_s: float = 2.0):
        self.tracking_uri, self.stream, self.interval_s = tracking_uri, stream, interval_s
        self.bars: dict[str, object] = {}
        self.done: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.live = hasattr(stream, "isatty") and stream.isatty()

    def on_phase(self, phase: str, parent_run_id: str) -> None:
        """The controller's phase hook: ``training`` starts the bars, ``evaluating`` ends them."""
        if phase == "training":
            self.start(parent_run_id)
        elif phase == "evaluating":
            self.stop()

    def start(self, parent_run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.parent = parent_run_id
        self.experiment = self.client.get_run(parent_run_id).info.experiment_id
        self._thread = threading.Thread(target=self._watch, name="training-progress", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001  (a busy store: the next poll catches up)
                continue

    def poll(self) -> None:
        """Bring every bar up to its run's latest report."""
        from tqdm.auto import tqdm

        runs = self.client.search_runs(
            [self.experiment], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent}'", order_by=["start_time ASC"]
        )
        with self._lock:
            for run in runs:
                run_id, data = run.info.run_id, run.data
                if run_id in self.done:
                    continue
                bar = self.bars.get(run_id)
                if bar is None:
                    total = int(float(data.params.get("train.steps", 0))) or None
                    label = "ADD steps" if len(runs) == 1 else f"ADD steps, {run.info.run_name}"
                    bar = self.bars[run_id] = tqdm(total=total, desc=label, file=self.stream, dynamic_ncols=True)
                    bar.set_postfix_str("starting (models, data)", refresh=False)
                step = int(data.metrics.get("step", 0))
                if step > bar.n:
                    bar.update(step - bar.n)
                losses = [f"{short} {data.metrics[key]:.3f}" for key, short in LOSSES if key in data.metrics]
                if losses:
                    bar.set_postfix_str(", ".join(losses), refresh=False)
                if "train.status" in data.tags or run.info.status != "RUNNING":
                    status = data.tags.get("train.status", run.info.status.lower())
                    if status != "completed":
                        bar.set_postfix_str(f"{bar.postfix}, {status}" if bar.postfix else status, refresh=False)
                    bar.close()
                    self.done.add(run_id)
                elif self.live:
                    bar.refresh()  # the elapsed time, on a terminal (a file would get a line every poll)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self.poll()
        except Exception:  # noqa: BLE001
            pass
        with self._lock:
            for run_id, bar in self.bars.items():
                if run_id not in self.done:
                    bar.close()
                    self.done.add(run_id)


def where(tracking_uri: str, experiment_id: str | None, parent_run_id: str | None) -> str:
    """How to look at the job's runs: the MLflow UI's address, or the command that serves it."""
    page = f"/#/experiments/{experiment_id}/runs/{parent_run_id}" if experiment_id and parent_run_id else ""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri}  (then http://127.0.0.1:5000{page})"
