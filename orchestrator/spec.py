"""The job spec: a job YAML mapped onto typed models, one line of help per field.

Unknown keys are errors; every error names the field's path, what was wrong and what is allowed
(``orchestrator/errors.py`` maps pydantic's errors onto paths). ``load_job(path, overrides)`` reads
a file, applies ``--set key=value`` overrides and validates; ``JobSpec.model_json_schema()`` is what
``addctl schema`` prints and what docs/job-reference.md is generated from.

Secrets appear only as references ``${env:NAME}``, and only where they are resolved: in ``env``,
``storage.options`` and ``data.storage_options``. A reference is resolved where the job runs (the
driver and each worker, ``workers.secrets.resolve_secrets``; a submitted job's ``env`` travels only
in its job.yaml, see ``orchestrator/jobs.py``), so the value is never in the job file, the job's
submission, a log or an MLflow run. Clear-text secrets are rejected anywhere in the job, the sweep included: a
secret-looking key with a literal value, or a value shaped like a credential
(``workers.secrets.CLEAR_SECRETS``: URL user-info and query tokens, connection-string keys, AWS key
ids, private keys, API tokens). Malformed references and shell-style ``${...}`` are rejected too.

Bounds (hostile input must fail fast, with exit 2): a job file is at most ``MAX_JOB_BYTES`` of
UTF-8, ``MAX_DEPTH`` levels and ``MAX_VALUES`` values, and its aliases expand to at most
``MAX_EXPANDED``; floats are finite, seeds in [0, 2³²); local input paths must exist (``load_job``).

Each section is declared once, beside the code that reads it: ``teacher``, ``student``,
``discriminator`` and ``loss`` in ``workers/add/config.py``; ``data`` and ``storage`` in
``workers/data/config.py``; ``train``, ``resources`` and their composition ``TrainJob`` (what a
training run reads) in ``workers/train/config.py``; ``eval`` in ``workers/eval/config.py``.
``JobSpec`` is a ``TrainJob`` plus what only the orchestrator reads: ``tracking``, ``eval``,
``promotion`` (the gates of ``orchestrator/promotion.py``) and ``sweep`` (``orchestrator/sweep.py``).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.errors import JobSpecError, Problem, format_path, problems_from_validation, safe_repr
from workers.config import Section, Seed, known_scheme
from workers.eval.config import EvalSpec
from workers.secrets import SECRET_REF, find_clear_secret
from workers.train.config import TrainJob, absolute_path

ANY_REF = re.compile(r"\$\{\s*env\s*:")
URI_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@")  # a URI that starts user:password@
SHELL_REF = re.compile(r"\$\{(?!env:)")  # ${HOME}, ${X:-y}: what a shell (or Ray's env_vars) would expand
# MLflow tracking URIs: a server, a database, a folder (a bare path is a folder too).
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
# Where ``${env:NAME}`` references are allowed (and resolved).
REFERENCE_SECTIONS = ("env", "storage.options", "data.storage_options")


def _tracking_uri(v: str | None) -> str | None:
    return v if v is None else known_scheme(v, TRACKING_SCHEMES, "tracking URI scheme", "a local folder")


# ---- what only the orchestrator reads: tracking, promotion, sweep --------------------------------


class TrackingSpec(Section):
    uri: Annotated[str | None, AfterValidator(_tracking_uri)] = Field(
        None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the embedded local store)"
    )
    experiment: str = Field("add", min_length=1, description="MLflow experiment")
    model_name: str | None = Field(None, min_length=1, description="registered model name (default: the job's name)")


class PromotionSpec(Section):
    """Gates a registered student must pass before ``addctl promote`` makes it the champion (null: gate off)."""

    max_fid_ratio: float | None = Field(1.0, gt=0, description="student FID ≤ this × the teacher's FID")
    alignment_margin: float | None = Field(0.0, ge=0, description="student alignment ≥ the teacher's − this")
    min_speedup: float | None = Field(10.0, gt=0, description="teacher ms/image ÷ student ms/image ≥ this")


class _Bounds(Section):
    @staticmethod
    def _ordered(v: tuple, positive: bool = False) -> tuple:
        lo, hi = v
        if not lo < hi:
            raise ValueError(f"the lower bound must be below the upper one (got [{lo}, {hi}])")
        if positive and lo <= 0:
            raise ValueError(f"loguniform bounds must be > 0 (got [{lo}, {hi}])")
        return v


class ChoiceDomain(Section):
    choice: list[Any] = Field(min_length=1, description="sample one of these values per trial")


class GridDomain(Section):
    grid: list[Any] = Field(min_length=1, description="run every value (times sweep.num_samples)")


class UniformDomain(_Bounds):
    uniform: tuple[float, float] = Field(description="a float drawn uniformly from [lo, hi]")

    @field_validator("uniform")
    @classmethod
    def _check(cls, v):
        return cls._ordered(v)


class LogUniformDomain(_Bounds):
    loguniform: tuple[float, float] = Field(description="a float drawn log-uniformly from [lo, hi], lo > 0")

    @field_validator("loguniform")
    @classmethod
    def _check(cls, v):
        return cls._ordered(v, positive=True)


class RandIntDomain(_Bounds):
    randint: tuple[int, int] = Field(description="an integer drawn uniformly from [lo, hi)")

    @field_validator("randint")
    @classmethod
    def _check(cls, v):
        return cls._ordered(v)


DOMAINS = {
    "choice": ChoiceDomain,
    "grid": GridDomain,
    "uniform": UniformDomain,
    "loguniform": LogUniformDomain,
    "randint": RandIntDomain,
}


def _domain_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return next(iter(type(value).model_fields))
    if isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in DOMAINS:
        return next(iter(value))
    return None


Domain = Annotated[
    Annotated[ChoiceDomain, Tag("choice")]
    | Annotated[GridDomain, Tag("grid")]
    | Annotated[UniformDomain, Tag("uniform")]
    | Annotated[LogUniformDomain, Tag("loguniform")]
    | Annotated[RandIntDomain, Tag("randint")],
    Discriminator(
        _domain_kind,
        custom_error_type="search_domain",
        custom_error_message=(
            "a search domain is one key: {choice: [...]}, {grid: [...]}, {uniform: [lo, hi]}, "
            "{loguniform: [lo, hi]} or {randint: [lo, hi]}"
        ),
    ),
]


class SweepSpec(Section):
    """A Ray Tune search over spec fields (run by ``orchestrator.sweep.run_sweep``); the best trial is registered."""

    search_space: dict[str, Domain] = Field(
        min_length=1,
        description="dotted spec path -> {choice|grid: [...]} or {uniform|loguniform|randint: [lo, hi]}; "
        "variant -> {grid: [{label: ..., dotted.path: value, ...}, ...]} sets several fields per point",
    )
    metric: str = Field("loss/distill", min_length=1, description="reported metric the trials are ranked by")
    mode: Literal["min", "max"] = Field("min", description="whether the metric is better low (min) or high (max)")
    num_samples: int = Field(4, ge=1, description="number of trials (each grid point runs this many times)")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="trials at once (default: as many as the cluster's CPUs and GPUs hold)"
    )
    scheduler: Literal["asha", "fifo"] | None = Field(
        "asha", description="asha: stop poor trials early; fifo (or null): every trial runs to the end"
    )
    grace_period: int = Field(1, ge=1, description="ASHA: reports before a trial may be stopped")
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep 1/this of the trials at each rung")
    max_t: int | None = Field(None, ge=1, description="ASHA: reports in a full run (default: from train.steps)")
    seed: Seed | None = Field(0, description="seed of the random search (null: random)")
    trial_cpus: float = Field(0.25, ge=0, description="CPUs of each trial's driver (it only waits on its trainer)")
    evaluate_all: bool = Field(
        False, description="evaluate every finished trial (the eval section) and register the best by eval_metric"
    )
    eval_metric: str = Field("student_fid", min_length=1, description="evaluate_all: the evaluation metric that ranks")
    eval_mode: Literal["min", "max"] = Field("min", description="evaluate_all: whether eval_metric is better low")
    max_failed_trials: int = Field(
        0, ge=0, description="trials that may fail (an error, not an early stop) and the job still succeed"
    )
    trial_retries: int = Field(
        1,
        ge=0,
        description="times a failed trial is resumed from its last checkpoint (not for bad data, a non-finite "
        "loss or a bad value: those come back)",
    )


# ---- the job --------------------------------------------------------------------------------------


class JobSpec(TrainJob):
    """One ADD job: a training run (``TrainJob``), then evaluated, tracked, registered; or a sweep of them."""

    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="student against teacher after training")
    promotion: PromotionSpec = Field(default_factory=PromotionSpec, description="gates for `addctl promote`")
    sweep: SweepSpec | None = Field(None, description="optional Ray Tune sweep (default: a single run)")

    def _localize(self, data: dict, cwd: Path) -> None:
        super()._localize(data, cwd)
        uri = self.tracking.uri
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            data["tracking"]["uri"] = "sqlite:///" + absolute_path(uri[len("sqlite:///") :], cwd)

    @model_validator(mode="after")
    def _table_student_steps(self):
        table = self.eval.table
        n = len(self.student.timesteps) if self.student.timesteps else self.student.steps
        if table is not None and any(k > n for k in table.student_steps):
            raise ValueError(f"eval.table.student_steps: {table.student_steps} — the student samples in 1..{n} steps")
        return self

    @model_validator(mode="after")
    def _no_clear_secrets(self):
        """Every string of the job, the sweep's included: references well-formed and where they resolve,
        no shell-style ``${...}``, nothing shaped like a credential in clear."""
        for path, value in _strings(self.model_dump(mode="python")):
            in_reference_section = any(path.startswith(s + ".") for s in REFERENCE_SECTIONS)
            if ANY_REF.search(value):
                if not in_reference_section:
                    raise ValueError(
                        f"{path}: ${{env:...}} references are resolved only in {', '.join(REFERENCE_SECTIONS)}; "
                        "set the value there, or put it in the workers' environment"
                    )
                if not SECRET_REF.match(value):
                    raise ValueError(
                        f"{path}: a malformed reference; a reference is the whole value, ${{env:NAME}} with NAME "
                        "made of letters, digits and _ (not starting with a digit)"
                    )
            if SHELL_REF.search(value):
                raise ValueError(
                    f"{path}: shell-style ${{...}} is not expanded (and Ray would expand it on some paths only); "
                    "write the value itself, or a ${env:NAME} reference in env"
                )
            if what := find_clear_secret(value):
                raise ValueError(
                    f"{path}: looks like {what} in clear; put the credential in the workers' environment and "
                    "refer to it as ${env:NAME} in env (or the variables the client reads)"
                )
        return self

    @model_validator(mode="after")
    def _sweep_paths(self):
        if self.sweep is not None:
            check_search_space(self)
        return self


def _strings(value, path: str = ""):
    """(dotted path, value) of every string in a nested dump."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


# ---- sweeps: every swept path exists and every value it can take is valid ------------------------


def sweepable_paths(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Dotted paths of the fields a sweep may vary: every leaf field but ``name``, ``sweep`` and mappings."""
    model = model or JobSpec
    paths = []
    for name, field in model.model_fields.items():
        if not prefix and name in ("name", "sweep", "env"):
            continue
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, Section):
            paths += sweepable_paths(inner, f"{prefix}{name}.")
        elif getattr(inner, "__origin__", None) is not dict:
            paths.append(prefix + name)
    return paths


def check_search_space(spec: JobSpec) -> None:
    """Raise a ``ValueError`` (path first) unless each swept path is a field and each value it can take is valid."""
    allowed = sweepable_paths()
    base = spec.model_dump(mode="python", exclude={"sweep"})
    for path, domain in spec.sweep.search_space.items():
        where = format_path(("sweep", "search_space", path))
        if path == VARIANT:
            _check_variants(spec, domain, where, allowed, base)
            continue
        if path not in allowed:
            close = difflib.get_close_matches(path, allowed, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{where}: {path!r} is not a field of the job spec that a sweep can vary{hint}")
        kind = _domain_kind(domain)
        values = getattr(domain, kind)
        if kind in ("choice", "grid"):
            candidates = [(f"{where}.{kind}[{i}]", v) for i, v in enumerate(values)]
        elif kind == "randint":
            candidates = [(f"{where}.randint", values[0]), (f"{where}.randint", values[1] - 1)]
        else:  # a float anywhere in [lo, hi]: both ends and a non-integral point inside
            lo, hi = values
            inside = lo + (hi - lo) * 0.37
            candidates = [(f"{where}.{kind}", lo), (f"{where}.{kind}", hi), (f"{where}.{kind}", inside)]
        for at, value in candidates:
            data = copy.deepcopy(base)
            set_field(data, path, value)
            try:
                JobSpec.model_validate(data)
            except ValidationError as err:
                problems = problems_from_validation(err, JobSpec)
                message = ([p for p in problems if p.path == path] or problems)[0].message
                message = re.sub(r" \(got .*\)$", "", message)
                if kind in ("uniform", "loguniform") and "integer" in message:
                    message += " (a float domain over an integer field: use randint, choice or grid)"
                shown = safe_repr(value) or "this value"
                raise ValueError(f"{at}: {shown} is not a valid {path}: {message}") from None


VARIANT = "variant"  # a search-space key whose values each set several fields: {label: ..., dotted.path: value}


def variant_fields(variant: Mapping) -> dict:
    """The fields a variant sets (its optional ``label`` names it in tables and is not a field)."""
    return {k: v for k, v in variant.items() if k != "label"}


def _check_variants(spec: JobSpec, domain, where: str, allowed: list[str], base: dict) -> None:
    kind = _domain_kind(domain)
    if kind not in ("choice", "grid"):
        raise ValueError(f"{where}: variants are a choice or a grid of mappings, not {kind}")
    for i, variant in enumerate(getattr(domain, kind)):
        at = f"{where}.{kind}[{i}]"
        if not isinstance(variant, Mapping) or not variant_fields(variant):
            raise ValueError(f"{at}: a variant is a mapping of dotted field paths to values (and an optional label)")
        data = copy.deepcopy(base)
        for path, value in variant_fields(variant).items():
            if path not in allowed:
                close = difflib.get_close_matches(path, allowed, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"{at}: {path!r} is not a field of the job spec that a sweep can vary{hint}")
            set_field(data, path, value)
        try:
            JobSpec.model_validate(data)
        except ValidationError as err:
            problem = problems_from_validation(err, JobSpec)[0]
            raise ValueError(f"{at}: {problem.path}: {problem.message}") from None


# ---- reading a job file ---------------------------------------------------------------------------


MAX_JOB_BYTES = 1 << 20  # a job file is a few kilobytes; more is a mistake (or an attack)
MAX_DEPTH = 32  # nesting of mappings and lists (a job file needs 5)
MAX_VALUES = 20_000  # values (keys, scalars, lists, mappings) written in the file (a large sweep has 500)
MAX_EXPANDED = (50_000, 2_000_000)  # values and characters once every alias is expanded


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that rejects duplicate and unhashable keys (PyYAML keeps the last, or crashes),
    nesting deeper than ``MAX_DEPTH`` (PyYAML's composer recurses), more than ``MAX_VALUES`` values
    (counted as they are read: the rest of the file is never scanned) and aliases that expand past
    ``MAX_EXPANDED`` (a few kilobytes of nested aliases stand for gigabytes once expanded)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._values = 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._values += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark
                )
            if self._values > MAX_VALUES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_VALUES:,} values: not a job file", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand past ``MAX_EXPANDED`` (or refer to themselves), without
    expanding it: each node's expanded size is computed once and shared by its aliases."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, characters) once expanded
    pending: set[int] = set()

    def size(node: yaml.Node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in pending:
            raise yaml.composer.ComposerError(None, None, "an alias refers to its own anchor", node.start_mark)
        pending.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        values, chars = 1, len(node.value) if isinstance(node, yaml.ScalarNode) else 0
        for child in children:
            v, c = size(child)
            values, chars = values + v, chars + c
        pending.discard(key)
        if values > MAX_EXPANDED[0] or chars > MAX_EXPANDED[1]:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases expand this document past {MAX_EXPANDED[0]:,} values or {MAX_EXPANDED[1]:,} characters",
                node.start_mark,
            )
        sizes[key] = (values, chars)
        return values, chars

    size(root)


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            kind = "mapping" if isinstance(key_node, yaml.MappingNode) else "list"
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain name, not a {kind}", key_node.start_mark
            )
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(None, None, "a key must be a plain name", key_node.start_mark)
        if key in seen:
            shown = repr(key) if len(repr(key)) <= 40 else repr(key)[:37] + "..."
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {shown} (each key once per section)", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text: str) -> Any:
    """YAML text as Python values, within the bounds above; raises ``yaml.YAMLError`` (with a mark)
    for anything it refuses, and nothing else but ``ValueError`` (a number too long to convert)."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
    except RecursionError:
        raise yaml.YAMLError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None


def parse_yaml(text: str, source: str = "<job>") -> dict:
    """A job file's text as a dict; every parsing problem becomes a ``JobSpecError`` with line and column."""
    if len(text) > MAX_JOB_BYTES:
        raise JobSpecError([Problem("(file)", f"larger than {MAX_JOB_BYTES:,} characters: not a job file")], source)
    try:
        data = load_yaml(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        reason = err.problem or err.context or "invalid YAML"
        raise JobSpecError([Problem("(yaml)", f"{where}{reason}")], source) from None
    except yaml.YAMLError as err:
        raise JobSpecError([Problem("(yaml)", str(err))], source) from None
    except Exception as err:  # noqa: BLE001  (e.g. an integer of 5,000 digits): bad input, never a traceback
        reason = "a number of more than 4,300 digits" if "digits" in str(err) else f"{type(err).__name__}: {err}"
        raise JobSpecError([Problem("(yaml)", f"cannot be read: {reason}")], source) from None
    if data is None:
        raise JobSpecError(
            [Problem("(root)", "the job file is empty; it needs at least name, teacher and data")], source
        )
    if not isinstance(data, dict):
        raise JobSpecError(
            [
                Problem(
                    "(root)",
                    f"a job file is a mapping of sections (name, teacher, data, ...), not a {type(data).__name__}",
                )
            ],
            source,
        )
    return data


def apply_overrides(data: dict, overrides: Sequence[str], model: type[BaseModel] | None = None) -> dict:
    """``data`` with each ``KEY=VALUE`` override set (VALUE parsed as YAML: numbers, lists, null...).

    KEY is a dotted path checked against ``model`` (default ``JobSpec``; a teacher job passes its own):
    ``train.steps``, ``env.HF_HOME``, ``sweep.search_space.loss.lambda_distill`` (for a mapping the rest
    of the path is the key).
    """
    data = copy.deepcopy(data)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem(f"--set {item}", "expected KEY=VALUE, e.g. --set train.steps=100"))
            continue
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except Exception as err:  # noqa: BLE001  (YAMLError, or a number too long to convert)
            problems.append(Problem(key, f"--set value is not valid YAML: {getattr(err, 'problem', None) or err}"))
            continue
        problem = set_field(data, key, value, model)
        if problem:
            problems.append(problem)
    if problems:
        raise JobSpecError(problems, "--set")
    return data


def set_field(data: dict, key: str, value: Any, model: type[BaseModel] | None = None) -> Problem | None:
    """Set the dotted ``key`` of a job's data to ``value`` (sections made as needed), or the problem with
    ``key``: no such field of ``model`` (default ``JobSpec``), or a field that is not a section."""
    model = model or JobSpec
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        field = model.model_fields.get(part)
        if field is None:
            close = difflib.get_close_matches(part, list(model.model_fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return Problem(path, f"unknown key in --set{hint}; allowed here: {', '.join(model.model_fields)}")
        inner = _section_type(field.annotation)
        last = i == len(parts) - 1
        if last:
            node[part] = value
            return None
        if inner is not None:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, model = node[part], inner
            continue
        if getattr(_non_optional(field.annotation), "__origin__", None) is dict:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node[part][".".join(parts[i + 1 :])] = value
            return None
        return Problem(path, f"is a {_type_name(field.annotation)}, not a section: set {path}=VALUE")
    return None


def _non_optional(tp):
    args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
    return args[0] if type(None) in getattr(tp, "__args__", ()) and len(args) == 1 else tp


def _section_type(tp) -> type[BaseModel] | None:
    tp = _non_optional(tp)
    return tp if isinstance(tp, type) and issubclass(tp, Section) else None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def validate_job(data: Mapping, source: str | None = None) -> JobSpec:
    """A dict (a parsed job file) as a ``JobSpec``; any problem raises ``JobSpecError`` naming the fields."""
    try:
        return JobSpec.model_validate(dict(data))
    except ValidationError as err:
        raise JobSpecError(problems_from_validation(err, JobSpec), source) from None
    except RecursionError:
        raise JobSpecError([Problem("(root)", "nested too deeply to validate")], source) from None
    except Exception as err:  # noqa: BLE001  (a validator tripped on input it did not expect): still bad input
        raise JobSpecError([Problem("(root)", f"cannot be validated: {type(err).__name__}: {err}")], source) from None


def read_job_text(path: str | os.PathLike) -> str:
    """A job file's text, at most ``MAX_JOB_BYTES`` of UTF-8; raises ``JobSpecError`` otherwise."""
    source = str(path)
    try:
        with open(path, "rb") as f:  # noqa: PTH123
            raw = f.read(MAX_JOB_BYTES + 1)  # a bounded read: /dev/zero or a 10 GB file are refused alike
    except FileNotFoundError:
        raise JobSpecError([Problem("(file)", "no such job file")], source) from None
    except OSError as err:
        raise JobSpecError([Problem("(file)", f"cannot read the job file: {type(err).__name__}")], source) from None
    if len(raw) > MAX_JOB_BYTES:
        raise JobSpecError([Problem("(file)", f"larger than {MAX_JOB_BYTES:,} bytes: not a job file")], source)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JobSpecError(
            [Problem("(file)", f"not UTF-8 text (byte {err.start}): a job file is YAML text")], source
        ) from None


def load_job(path: str | os.PathLike, overrides: Sequence[str] = (), *, check_paths: bool = True) -> JobSpec:
    """Read, override (``--set KEY=VALUE``) and validate a job file; raises ``JobSpecError``.

    ``check_paths``: the local paths the job reads must exist here (off for a job submitted to a
    cluster elsewhere, whose paths are on its own disks; the cluster checks them when it loads the job).
    """
    source = str(path)
    data = parse_yaml(read_job_text(path), source)
    try:
        data = apply_overrides(data, overrides)
    except JobSpecError:
        raise
    except Exception as err:  # noqa: BLE001  (an override on input it did not expect): bad input all the same
        raise JobSpecError([Problem("--set", f"cannot be applied: {type(err).__name__}: {err}")], source) from None
    spec = validate_job(data, source)
    if check_paths and (problems := missing_paths(spec) or teacher_problems(spec)):
        raise JobSpecError(problems, source)
    return spec


def teacher_problems(spec: JobSpec) -> list[Problem]:
    """What a local teacher folder's network config says against the teacher section, read as JSON (no
    model loaded): ``teacher.guidance`` on a network without a guidance embedding. A hub id is checked
    where it is loaded (``load_teacher`` refuses the same)."""
    import json

    teacher = spec.teacher
    if teacher.guidance is None or not _CLEARLY_A_PATH.match(teacher.source):
        return []
    root = Path(teacher.source.removeprefix("file://")).expanduser()
    config = next((root / name / "config.json" for name in ("transformer", "unet") if (root / name).is_dir()), None)
    if config is None or not config.is_file():
        return []  # not a teacher folder: load_teacher names what is missing
    try:
        network = json.loads(config.read_text())
    except (OSError, ValueError):
        return []
    if not network.get("guidance_embeds"):
        name = network.get("_class_name", "network")
        return [
            Problem(
                "teacher.guidance",
                f"the teacher's {name} has no guidance embedding (guidance_embeds is not set): guidance is an "
                "input of guidance-distilled networks (FLUX.1-dev) only; remove it (use loss.guidance_scale for CFG)",
            )
        ]
    return []


# Fields the job reads from: a local path there must exist (a hub id or a relative name is left alone).
INPUT_PATHS = (
    "teacher.source",
    "discriminator.dinov2",
    "data.uri",
    "eval.clip_model",
    "eval.table.teacher_rows",
    "eval.table.reference_uri",
)
_CLEARLY_A_PATH = re.compile(r"^(/|\./|\.\./|~|file://)")


def missing_paths(spec: JobSpec) -> list[Problem]:
    """A problem for each input that clearly is a local path (``/…``, ``./…``, ``../…``, ``~…``,
    ``file://…``) but exists nowhere on this machine."""
    problems = []
    for path in INPUT_PATHS:
        value: Any = spec
        for part in path.split("."):
            value = getattr(value, part, None)
        if not isinstance(value, str) or not _CLEARLY_A_PATH.match(value):
            continue
        local = value[len("file://") :] if value.startswith("file://") else value
        try:
            exists = Path(local).expanduser().exists()
        except (OSError, ValueError, RuntimeError) as err:  # a name too long, a NUL byte, an unknown ~user
            problems.append(Problem(path, f"not a usable path ({type(err).__name__})"))
            continue
        if not exists:
            problems.append(Problem(path, "no such file or folder on this machine"))
    return problems


def job_yaml(data: Mapping) -> str:
    """A job's dump (``model_dump(mode="json")``, of an ADD or a teacher job) as YAML: its sections in
    their order, text as written."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def dump_job(spec: JobSpec) -> str:
    """The job as YAML with every default filled in (references stay references): what a submitted job
    runs, and what every MLflow run of it logs as ``job.yaml``."""
    return job_yaml(spec.model_dump(mode="json"))
