"""What every section of a job file shares: the base model and the field types of more than one section.

Each worker package declares the typed model of its own section beside the code that reads it
(``workers/add/config.py``, ``workers/data/config.py``, ``workers/train/config.py``,
``workers/eval/config.py``); ``orchestrator/spec.py`` composes them into the job spec. Imports
nothing heavy: validating a job file must not load torch or Ray.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SEED_MAX = 2**32 - 1  # seeds are mixed with step numbers into 64-bit generator seeds
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class Section(BaseModel):
    """Base of every section: unknown keys are rejected, assignments validated, NaN and infinity refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


def known_scheme(v: str, schemes, what: str, otherwise: str) -> str:
    """``v`` unless it is a URI whose scheme is not one of ``schemes``."""
    not_blank(v)
    scheme = SCHEME.match(v)
    if scheme and scheme[1].lower() not in schemes:
        raise ValueError(
            f"unsupported {what} {scheme[1][:20]}://; supported: {', '.join(s + '://' for s in schemes)} or {otherwise}"
        )
    return v


def _model_source(v: str) -> str:
    not_blank(v)
    if SCHEME.match(v):
        raise ValueError("a local folder or a Hugging Face hub id (org/name), not a URI")
    return v


Text = Annotated[str, AfterValidator(not_blank)]  # a string where empty means nothing
ModelSource = Annotated[str, AfterValidator(_model_source)]  # a local folder or a hub id
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
