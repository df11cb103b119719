"""The stream a phase's progress bar is drawn on: the terminal a person watches.

``addctl run`` sends the process's own stdout and stderr to the run's log file and points this at
the terminal (``orchestrator.console.Console``), so a bar drawn here (the evaluation's rows) stays
on the console while library chatter does not. Elsewhere (tests, ``teacher_rows``) it is stderr.
"""

from __future__ import annotations

import sys
from typing import TextIO

_stream: TextIO | None = None


def progress_stream() -> TextIO:
    """Where a progress bar a person should see goes (``tqdm(..., file=progress_stream())``)."""
    return _stream if _stream is not None else sys.stderr


def set_progress_stream(stream: TextIO | None) -> None:
    """Draw the phases' bars on ``stream`` (None: back to stderr)."""
    global _stream
    _stream = stream
