"""Errors the user can act on: each names the field's path, what was wrong and what is allowed.

``JobSpecError`` carries one ``Problem`` per bad field. Pydantic's ``ValidationError`` is mapped onto
it by ``problems_from_validation``: locations become paths (``train.batch_size``,
``sweep.search_space["loss.lambda_distill"].choice[1]``), an unknown key lists the keys allowed
there, and a value is echoed only where it cannot be a secret (never under ``env``, ``options``,
``storage_options`` or a secret-looking key, never from a validator's own message).

Messages are bounded and built without expanding the input: a value is echoed through
``reprlib`` (``safe_repr``: a few items, 60 characters, never a credential-shaped or random-looking
string), each problem is one line of at most ``MESSAGE_MAX`` characters, at most ``PROBLEMS_MAX``
are listed, and every one passes the redactor (``workers.secrets.redact``).

A validator that knows a more precise path than where pydantic runs it (a check across fields)
starts its message with that path and a colon: ``"train.batch_size: must be a multiple of ..."``.
"""

from __future__ import annotations

import re
import reprlib
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from workers.secrets import SECRET_NAME, find_clear_secret, redact

# Locations pydantic adds for union members and wrapped validators: not part of the user's path.
_TYPE_SEGMENT = re.compile(
    r"^(int|float|str|bool|none|list|dict|tuple|set|literal|union|nullable|chain|lax-or-strict|json-or-python)"
    r"($|\[)|^(function-|tagged-union|constrained-)"
)
_PATH_PREFIX = re.compile(r"^((?:[A-Za-z_][\w-]*|\[[^\]]+\])(?:\.[\w-]+|\[[^\]]+\])*): (.+)$", re.S)
_NO_ECHO_SECTIONS = {"env", "options", "storage_options"}
MESSAGE_MAX = 300  # characters of one problem's message (input never makes a message long)
PROBLEMS_MAX = 20  # problems listed; the rest are counted
_QUOTED_KEYS = {"search_space"}  # mappings whose keys are paths themselves: always shown as ["key"]
_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job file: where (a dotted path) and what (wrong, and what is allowed)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class JobSpecError(ValueError):
    """A job file (or an override) that cannot be used; ``problems`` lists every bad field."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None):
        self.problems = [Problem(_bounded(p.path, 120), _bounded(p.message, MESSAGE_MAX)) for p in problems]
        self.source = _bounded(source, 200) if source is not None else None
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        n = len(self.problems)
        head = f"{where}invalid job ({n} problem{'s' if n != 1 else ''})"
        shown = [f"  {p}" for p in self.problems[:PROBLEMS_MAX]]
        if n > PROBLEMS_MAX:
            shown.append(f"  ... and {n - PROBLEMS_MAX} more")
        return "\n".join([head, *shown])


def _bounded(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters, every secret masked (the one redactor of messages)."""
    text = " ".join(redact(str(text)[: limit * 4]).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_path(loc: Iterable[object]) -> str:
    """``("sweep", "search_space", "loss.lr", "choice", 1)`` -> ``sweep.search_space["loss.lr"].choice[1]``."""
    out, previous = "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY.match(str(part)) and previous not in _QUOTED_KEYS:
            out += f".{part}" if out else str(part)
        else:
            out += f'["{part}"]'
        previous = part
    return out


def _model_at(root: type[BaseModel], loc: Sequence[object]) -> type[BaseModel] | None:
    """The model class that holds the fields at ``loc`` (to list the keys allowed there)."""
    current: object = root
    for part in loc:
        model = _as_model(current)
        if model is not None and isinstance(part, str) and part in model.model_fields:
            current = model.model_fields[part].annotation
        else:
            current = _item_type(current)
        if current is None:
            return None
    return _as_model(current)


def _optional_inner(tp: object) -> object:
    """``X | None`` -> ``X``; anything else unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _as_model(tp: object) -> type[BaseModel] | None:
    tp = _optional_inner(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _item_type(tp: object) -> object:
    """The value type of a list/dict annotation (``list[X]`` -> X, ``dict[str, X]`` -> X)."""
    tp = _optional_inner(tp)
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (list, tuple, set) and args:
        return args[0]
    if typing.get_origin(tp) is dict and len(args) == 2:
        return args[1]
    return None


def _may_echo(loc: Sequence[object]) -> bool:
    """Whether the offending value may be shown: never where a secret could be."""
    for part in loc:
        if str(part) in _NO_ECHO_SECTIONS or SECRET_NAME.search(str(part)):
            return False
    return True


# A run of 20+ key-like characters mixing upper and lower case and digits: possibly a key, not echoed.
_RANDOM_LOOKING = re.compile(r"(?=[A-Za-z0-9+/=_-]{20,})(?=[^\s'\"]*[A-Z])(?=[^\s'\"]*[a-z])(?=[^\s'\"]*[0-9])")
_REPR = reprlib.Repr()  # never walks more of a value than it shows
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def looks_secret(value: object) -> bool:
    """Whether a value looks like a credential whatever its key (a URL password, an AWS key id...)."""
    return find_clear_secret(_REPR.repr(value) if not isinstance(value, str) else value[:4000]) is not None


def safe_repr(value: object) -> str | None:
    """The value as it may appear in a message (a short repr that never walks the whole input), or
    None where it must not (a possible secret)."""
    text = _REPR.repr(value)
    if looks_secret(value) or SECRET_NAME.search(text) or _RANDOM_LOOKING.search(text):
        return None
    return text if len(text) <= 60 else text[:57] + "..."


def _message(err: dict, root: type[BaseModel], loc: tuple) -> tuple[str, str, str | None]:
    """(path, message, the offending value if it may be shown) for one pydantic error dict."""
    kind, ctx = err["type"], err.get("ctx") or {}
    path = format_path(loc)
    if kind == "missing":
        return path, "required, but missing", None
    if kind == "extra_forbidden":
        model = _model_at(root, loc[:-1])
        allowed = ", ".join(model.model_fields) if model else "see `addctl schema`"
        return path, f"unknown key; allowed here: {allowed}", None
    if kind in ("value_error", "assertion_error"):
        text = str(ctx.get("error") or err["msg"])
        text = re.sub(r"^(Value error|Assertion failed), ", "", text)
        match = _PATH_PREFIX.match(text)
        if match and (not path or match.group(1).startswith(path)):
            return match.group(1), match.group(2), None
        return path, text, None
    text = err["msg"]
    text = text[0].lower() + text[1:] if text else text
    text = text.replace("input should be", "must be").replace("Input should be", "must be")
    bounds = {
        "greater_than": f"must be > {ctx.get('gt')}",
        "greater_than_equal": f"must be ≥ {ctx.get('ge')}",
        "less_than": f"must be < {ctx.get('lt')}",
        "less_than_equal": f"must be ≤ {ctx.get('le')}",
    }
    shown = safe_repr(err["input"]) if "input" in err and _may_echo(loc) else None
    return path, bounds.get(kind, text), shown


def _user_loc(loc: Sequence[object]) -> tuple:
    """The location without pydantic's union-member and tag segments (``a.choice.choice`` -> ``a.choice``)."""
    out: list[object] = []
    for part in loc:
        if isinstance(part, str) and _TYPE_SEGMENT.match(part):
            continue
        if out and part == out[-1] and isinstance(part, str):
            continue  # a tagged union repeats its tag before the field of the same name
        out.append(part)
    return tuple(out)


def problems_from_validation(error: ValidationError, root: type[BaseModel], prefix: Sequence[object] = ()) -> list:
    """One ``Problem`` per bad field of a pydantic ``ValidationError`` raised validating ``root``."""
    merged: dict[str, tuple[list[str], str | None]] = {}
    for err in error.errors(include_url=False):
        loc = _user_loc(err["loc"])
        path, message, shown = _message(err, root, loc)
        if prefix:
            path = format_path(prefix) + ("" if not path or path.startswith("[") else ".") + path
        messages, _ = merged.setdefault(path, ([], shown))
        if message not in messages:
            messages.append(message)
    return [
        Problem(path, " or ".join(messages) + (f" (got {shown})" if shown else ""))
        for path, (messages, shown) in merged.items()
    ]
