"""Promotion: move the alias ``champion`` to a model version only when its evaluation passes the job's gates.

What ``addctl promote NAME VERSION [--force --reason TEXT]`` calls (``promote``):

1. The version's evaluation is read from its tags (``eval/student_fid`` ... written when it was
   registered) and judged against the gates (given, or the ones the job stored on the version as
   ``promotion/gates``). Each gate's outcome is written as version tags ``gate/<name>`` (pass /
   fail / missing) and ``gate/<name>/detail``.
2. A failed gate raises ``PromotionRefused``: no alias moves. ``force=True`` promotes anyway and
   needs a ``reason``, recorded as ``promotion/reason``.
3. Under the registry lock (``RegistryLock``: an atomic create of ``<name>.promotion-lock``), the
   current champion is read, the version is tagged with the promotion's sequence number, the
   version it replaces, who and when; ``previous-champion`` moves to the replaced version and
   ``champion`` to this one; the registered model's ``promotion/seq`` is bumped. Concurrent
   promotions are thereby serialised: whatever their interleaving, the champion is the version
   with the highest ``promotion/seq``, ``previous-champion`` is the ``promotion/previous`` it
   recorded, and no promotion's record is lost.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from mlflow.tracking import MlflowClient

from orchestrator.registry import (
    CHAMPION,
    PREVIOUS_CHAMPION,
    RegistryLock,
    alias_version,
    set_version_tags,
    whoami,
)
from orchestrator.spec import PromotionSpec

EVAL_PREFIX = "eval/"  # version tags (and child-run metrics) holding the evaluation
GATES_TAG = "promotion/gates"


def gates_from_mapping(values: Mapping) -> PromotionSpec:
    """Gates from a dict (given to ``promote``, or the JSON a job stored on a version as
    ``promotion/gates``); keys this code no longer knows are ignored."""
    return PromotionSpec.model_validate({k: v for k, v in dict(values).items() if k in PromotionSpec.model_fields})


def gates_json(gates: PromotionSpec) -> str:
    return json.dumps(gates.model_dump(), sort_keys=True)


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool | None  # None: the metrics it needs are missing (counts as a failure)
    detail: str

    @property
    def outcome(self) -> str:
        return {True: "pass", False: "fail", None: "missing"}[self.passed]


def check_gates(gates: PromotionSpec, metrics: Mapping[str, float]) -> list[GateResult]:
    """Judge evaluation metrics (``student_fid``, ``teacher_fid``, ... without prefix) against ``gates``."""

    def need(*keys: str) -> list[float] | None:
        return [float(metrics[k]) for k in keys] if all(k in metrics for k in keys) else None

    results = []
    if gates.max_fid_ratio is not None:
        values = need("student_fid", "teacher_fid")
        if values is None:
            results.append(GateResult("fid", None, "student_fid or teacher_fid not evaluated"))
        else:
            s, t = values
            ok = s <= gates.max_fid_ratio * t
            detail = f"student FID {s:.4g} {'≤' if ok else '>'} {gates.max_fid_ratio:g} × teacher FID {t:.4g}"
            results.append(GateResult("fid", ok, detail))
    if gates.alignment_margin is not None:
        values = need("student_alignment", "teacher_alignment")
        if values is None:
            results.append(GateResult("alignment", None, "student_alignment or teacher_alignment not evaluated"))
        else:
            s, t = values
            ok = s >= t - gates.alignment_margin
            detail = f"student alignment {s:.4g} {'≥' if ok else '<'} teacher {t:.4g} − {gates.alignment_margin:g}"
            results.append(GateResult("alignment", ok, detail))
    if gates.min_speedup is not None:
        values = need("speedup")
        if values is None:
            results.append(GateResult("speedup", None, "speedup not evaluated"))
        else:
            (s,) = values
            ok = s >= gates.min_speedup
            results.append(GateResult("speedup", ok, f"speed-up {s:.4g}× {'≥' if ok else '<'} {gates.min_speedup:g}×"))
    return results


def eval_tags(metrics: Mapping[str, float], gates: PromotionSpec | None = None) -> dict[str, str]:
    """Version tags recording an evaluation (and the job's gates) at registration."""
    tags = {f"{EVAL_PREFIX}{k}": repr(float(v)) for k, v in metrics.items()}
    if gates is not None:
        tags[GATES_TAG] = gates_json(gates)
    return tags


def metrics_from_tags(tags: Mapping[str, str]) -> dict[str, float]:
    out = {}
    for key, value in tags.items():
        if key.startswith(EVAL_PREFIX):
            try:
                out[key[len(EVAL_PREFIX) :]] = float(value)
            except ValueError:
                continue
    return out


class PromotionRefused(RuntimeError):
    """A gate failed (or lacked its metrics); no alias moved."""

    def __init__(self, name: str, version: str, results: list[GateResult]):
        self.results = results
        failed = "; ".join(f"{r.name}: {r.detail}" for r in results if not r.passed) or "no gates to judge by"
        super().__init__(f"{name} version {version} not promoted: {failed}")


@dataclass
class Promotion:
    """What a promotion did."""

    name: str
    version: str
    previous: str | None  # the champion it replaced
    seq: int
    forced: bool
    gates: list[GateResult] = field(default_factory=list)


def promote(
    name: str,
    version: str | int,
    *,
    force: bool = False,
    reason: str | None = None,
    gates: PromotionSpec | Mapping | None = None,
    client: MlflowClient | None = None,
    lock_timeout_s: float = 60.0,
) -> Promotion:
    """Make ``version`` of ``name`` the champion if it passes the gates (or ``force`` with a ``reason``)."""
    if force and not (reason and reason.strip()):
        raise ValueError("a forced promotion needs a reason (--reason): it is recorded on the version")
    client = client or MlflowClient()
    version = str(version)
    mv = client.get_model_version(name, version)  # fails clearly for an unknown model or version
    if gates is None:
        stored = mv.tags.get(GATES_TAG)
        gates = gates_from_mapping(json.loads(stored)) if stored else None
    elif not isinstance(gates, PromotionSpec):
        gates = gates_from_mapping(gates)
    results = check_gates(gates, metrics_from_tags(mv.tags)) if gates is not None else []
    passed = gates is not None and all(r.passed for r in results)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    attempt = {f"gate/{r.name}": r.outcome for r in results}
    attempt |= {f"gate/{r.name}/detail": r.detail for r in results}
    attempt |= {"gate/passed": str(passed).lower(), "gate/checked_at": now}
    set_version_tags(client, name, version, attempt)
    if not passed and not force:
        set_version_tags(client, name, version, {"promotion/status": "refused", "promotion/refused_at": now})
        raise PromotionRefused(name, version, results)

    with RegistryLock(client, name, timeout_s=lock_timeout_s) as lock:
        previous = alias_version(client, name, CHAMPION)
        previous = previous if previous != version else None  # re-promoting the champion replaces nothing
        seq = int(client.get_registered_model(name).tags.get("promotion/seq", "0")) + 1
        record = {
            "promotion/status": "forced" if force and not passed else "promoted",
            "promotion/seq": seq,
            "promotion/previous": previous or "",
            "promotion/at": now,
            "promotion/by": whoami(),
            "promotion/forced": str(bool(force)).lower(),
        }
        if force:
            record["promotion/reason"] = reason.strip()
        set_version_tags(client, name, version, record)
        if previous is not None:  # moved first: a crash before the next line leaves the champion as it was
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, previous)
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_registered_model_tag(name, "promotion/seq", str(seq))
        lock.check()  # a lease broken mid-way would be reported, not silently accepted
    return Promotion(name, version, previous, seq, force and not passed, results)
