"""Promotion against a real MLflow server: gates, forced promotions, and concurrent promotions that stay consistent."""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import nullcontext

import pytest
from mlflow.tracking import MlflowClient

import orchestrator.promotion as promotion
from orchestrator.promotion import PromotionRefused, check_gates, eval_tags, promote
from orchestrator.registry import (
    CANDIDATE,
    CHAMPION,
    PREVIOUS_CHAMPION,
    LockTimeout,
    RegistryLock,
    aliases,
    register_candidate,
)
from orchestrator.spec import PromotionSpec

SPEED_ONLY = PromotionSpec(max_fid_ratio=None, alignment_margin=None, min_speedup=2.0)
GATES = PromotionSpec(max_fid_ratio=1.2, alignment_margin=0.05, min_speedup=10)
GOOD = {
    "student_fid": 11.0,
    "teacher_fid": 10.0,
    "student_alignment": 0.30,
    "teacher_alignment": 0.32,
    "speedup": 40.0,
}
BAD_FID = GOOD | {"student_fid": 30.0}


def new_version(client: MlflowClient, name: str, metrics: dict, gates: PromotionSpec | None = GATES) -> str:
    """A registered version of ``name`` carrying an evaluation, as the controller registers students."""
    experiment = client.get_experiment_by_name("promotion-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("promotion-tests")
    run = client.create_run(experiment_id)
    mv = register_candidate(
        client, name, f"{run.info.artifact_uri}/student", run.info.run_id, tags=eval_tags(metrics, gates)
    )
    return mv.version


@pytest.fixture
def model(mlflow_tracking):
    """A fresh registered model name with version 1 already champion."""
    client = mlflow_tracking.client()
    name = f"promo-{uuid.uuid4().hex[:8]}"
    promote(name, new_version(client, name, GOOD), client=client)
    return client, name


def test_gates_judge_each_metric():
    results = {r.name: r for r in check_gates(GATES, BAD_FID | {"speedup": 9.0})}
    assert (results["fid"].passed, results["alignment"].passed, results["speedup"].passed) == (False, True, False)
    assert "30" in results["fid"].detail and "1.2" in results["fid"].detail
    missing = {r.name: r.outcome for r in check_gates(GATES, {"speedup": 50.0})}
    assert missing == {"fid": "missing", "alignment": "missing", "speedup": "pass"}
    assert [r.name for r in check_gates(SPEED_ONLY, GOOD)] == ["speedup"]


def test_failed_gate_is_refused_and_moves_no_alias(model):
    client, name = model
    bad = new_version(client, name, BAD_FID)
    before = aliases(client, name)
    assert before == {CHAMPION: "1", CANDIDATE: bad}
    with pytest.raises(PromotionRefused, match="fid: student FID 30"):
        promote(name, bad, client=client)
    assert aliases(client, name) == before
    tags = client.get_model_version(name, bad).tags
    assert tags["gate/fid"] == "fail" and tags["gate/speedup"] == "pass" and tags["gate/passed"] == "false"
    assert tags["promotion/status"] == "refused" and "promotion/seq" not in tags


def test_version_without_evaluation_is_refused(model):
    client, name = model
    bare = new_version(client, name, {}, gates=None)
    with pytest.raises(PromotionRefused, match="no gates"):
        promote(name, bare, client=client)
    with pytest.raises(PromotionRefused, match="not evaluated"):
        promote(name, bare, client=client, gates=GATES)
    assert aliases(client, name)[CHAMPION] == "1"


def test_passing_version_becomes_champion(model):
    client, name = model
    good = new_version(client, name, GOOD)
    done = promote(name, good, client=client)
    assert (done.previous, done.seq, done.forced) == ("1", 2, False)
    assert aliases(client, name) == {CHAMPION: good, PREVIOUS_CHAMPION: "1", CANDIDATE: good}
    tags = client.get_model_version(name, good).tags
    assert tags["gate/passed"] == "true" and tags["promotion/status"] == "promoted"
    assert (tags["promotion/previous"], tags["promotion/seq"]) == ("1", "2")
    assert client.get_registered_model(name).tags["promotion/seq"] == "2"


def test_forced_promotion_needs_and_records_a_reason(model):
    client, name = model
    bad = new_version(client, name, BAD_FID)
    for reason in (None, "  "):
        with pytest.raises(ValueError, match="needs a reason"):
            promote(name, bad, client=client, force=True, reason=reason)
    assert aliases(client, name)[CHAMPION] == "1"
    done = promote(name, bad, client=client, force=True, reason="FID regressed on purpose: new data mix")
    assert done.forced and aliases(client, name)[CHAMPION] == bad
    tags = client.get_model_version(name, bad).tags
    assert tags["promotion/reason"] == "FID regressed on purpose: new data mix"
    assert (tags["promotion/status"], tags["promotion/forced"], tags["gate/fid"]) == ("forced", "true", "fail")


class SlowChampionReads(MlflowClient):
    """A client that dawdles between reading the champion and writing: widens the race window."""

    def get_model_version_by_alias(self, name, alias):
        version = super().get_model_version_by_alias(name, alias)
        time.sleep(0.5)
        return version


class LockstepChampionReads(MlflowClient):
    """A client whose promotions all read the champion before any of them writes: the race, for sure."""

    def __init__(self, url: str, barrier: threading.Barrier):
        super().__init__(url, url)
        self.barrier = barrier

    def get_model_version_by_alias(self, name, alias):
        version = super().get_model_version_by_alias(name, alias)
        self.barrier.wait(timeout=60)
        return version


def promote_concurrently(url: str, name: str, versions: list[str], client_factory=None) -> list:
    barrier, errors = threading.Barrier(len(versions)), []
    client_factory = client_factory or (lambda: SlowChampionReads(url, url))

    def run(version):
        try:
            barrier.wait()
            promote(name, version, client=client_factory())
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


def consistency_problems(client: MlflowClient, name: str, versions: list[str]) -> list[str]:
    """The invariants a serial history guarantees, as a list of violations."""
    found = aliases(client, name)
    tags = {v: client.get_model_version(name, v).tags for v in versions}
    seqs = {v: int(t["promotion/seq"]) for v, t in tags.items()}
    problems = []
    if sorted(seqs.values()) != [2, 3]:
        problems.append(f"sequence numbers {seqs} are not 2 and 3")
    last = max(versions, key=seqs.get)
    first = min(versions, key=seqs.get)
    if found[CHAMPION] != last:
        problems.append(f"champion {found[CHAMPION]} is not the last promoted {last}")
    if tags[last]["promotion/previous"] != first or found.get(PREVIOUS_CHAMPION) != first:
        problems.append(
            f"last promotion replaced {tags[last]['promotion/previous']!r}, previous-champion is "
            f"{found.get(PREVIOUS_CHAMPION)!r}, but {first} was champion before it"
        )
    if tags[first]["promotion/previous"] != "1":
        problems.append(f"first promotion replaced {tags[first]['promotion/previous']!r}, not 1")
    return problems


def test_concurrent_promotions_end_consistent(model, mlflow_tracking):
    client, name = model
    versions = [new_version(client, name, GOOD), new_version(client, name, GOOD)]
    assert promote_concurrently(mlflow_tracking.url, name, versions) == []
    assert consistency_problems(client, name, versions) == []
    assert client.get_registered_model(name).tags["promotion/seq"] == "3"
    assert [m.name for m in client.search_registered_models(f"name LIKE '{name}%'")] == [name]  # lock released


class NoLock:
    def check(self):
        pass


def test_without_the_lock_the_same_race_is_inconsistent(model, mlflow_tracking, monkeypatch):
    """The control: the concurrency test above would catch a promotion that is not serialised."""
    client, name = model
    monkeypatch.setattr(promotion, "RegistryLock", lambda *a, **k: nullcontext(NoLock()))
    versions = [new_version(client, name, GOOD), new_version(client, name, GOOD)]
    lockstep = threading.Barrier(2)
    factory = lambda: LockstepChampionReads(mlflow_tracking.url, lockstep)  # noqa: E731
    errors = promote_concurrently(mlflow_tracking.url, name, versions, factory)
    if errors:  # the race can also trip the server: both writers insert the same alias row at once
        assert all("registered_model_aliases" in str(err) for err in errors), errors
    else:
        assert consistency_problems(client, name, versions) != []


def test_registry_lock_excludes_times_out_and_breaks_stale_leases(mlflow_tracking):
    client, name = mlflow_tracking.client(), f"lock-{uuid.uuid4().hex[:8]}"
    with RegistryLock(client, name) as held:
        with pytest.raises(LockTimeout, match="locked by"):
            RegistryLock(client, name, timeout_s=0.5).acquire()
        held.check()
    RegistryLock(client, name).acquire()  # released above; now a holder that "crashes" with a short lease
    crashed = RegistryLock(client, name, ttl_s=0.5)
    client.delete_registered_model(name + ".promotion-lock")
    crashed.acquire()
    time.sleep(0.6)
    with RegistryLock(client, name, timeout_s=5) as taker:
        with pytest.raises(Exception, match="expired and was taken over"):
            crashed.check()
        taker.check()
    assert not client.search_registered_models(f"name = '{name}.promotion-lock'")
