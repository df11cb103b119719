"""The balance between L_G and λ·L_distill: its figures against hand-computed cases, the adaptive λ_adv,
the heads-at-chance warning, and a learning test in which the heads leave chance and help the student."""

import math

import pytest
import torch

from orchestrator.spec import JobSpec
from workers.add.balance import Balance, hinge_chance, output_balance, separability, split_backward
from workers.add.losses import DistillationLoss, R1Penalty
from workers.add.step import ADDObjective
from workers.add.toy import run_toy
from workers.train.metrics import HeadsMonitor, IntervalMetrics


def test_output_balance_by_hand():
    g_adv, g_distill = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]])
    m = output_balance(g_adv, g_distill, torch.tensor(2.0))
    # ‖2·(3, 4)‖ = 10, ‖(0, 2)‖ = 2, cos = (3·0 + 4·2) / (5·2) = 0.8
    assert m["balance/grad_adv_x"] == pytest.approx(10.0)
    assert m["balance/grad_distill_x"] == pytest.approx(2.0)
    assert m["balance/ratio_x"] == pytest.approx(5.0)
    assert m["balance/cos_x"] == pytest.approx(0.8)
    assert m["balance/lambda_adv"] == 2.0


def test_split_backward_gives_each_terms_gradient_and_their_sum():
    """A linear student x̂θ = W x: ∇_W of ⟨g, x̂θ⟩ is g xᵀ, so both norms and the cosine are known."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(3, 4))
    x = torch.randn(5, 4)
    g_adv, g_distill = torch.randn(5, 3), torch.randn(5, 3)
    expected_adv, expected_distill = g_adv.T @ x, g_distill.T @ x
    m = split_backward(x @ W.T, g_adv, g_distill, [W])
    assert m["balance/grad_adv_theta"] == pytest.approx(float(expected_adv.norm()), rel=1e-5)
    assert m["balance/grad_distill_theta"] == pytest.approx(float(expected_distill.norm()), rel=1e-5)
    cos = float((expected_adv * expected_distill).sum() / (expected_adv.norm() * expected_distill.norm()))
    assert m["balance/cos_theta"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert m["balance/ratio_theta"] == pytest.approx(float(expected_adv.norm() / expected_distill.norm()), rel=1e-5)
    # the two passes add up to the one-pass gradient the optimizer steps on
    torch.testing.assert_close(W.grad, expected_adv + expected_distill)
    with pytest.raises(RuntimeError, match="first micro-batch"):
        split_backward(x @ W.T, g_adv, g_distill, [W])


def test_adaptive_balance_keeps_the_ratio_and_fixed_keeps_lambda():
    adaptive = Balance("adaptive", ratio=0.25)
    lam = adaptive.weight(torch.tensor(8.0), torch.tensor(2.0))
    assert float(lam) * 8.0 == pytest.approx(0.25 * 2.0)
    assert float(adaptive.weight(torch.tensor(0.0), torch.tensor(1.0))) == 1e4  # clamped, not infinite
    assert float(Balance(lambda_adv=0.7).weight(torch.tensor(8.0), torch.tensor(2.0))) == pytest.approx(0.7)
    assert not Balance(lambda_adv=0.0).needs_adv_gradient and Balance("adaptive").needs_adv_gradient
    with pytest.raises(ValueError, match="unknown balance"):
        Balance("auto")


def test_separability_by_hand():
    real = [torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])]  # per-sample means 1, 2, 3
    fake = [torch.tensor([[0.0], [2.5], [-1.0]])]
    m = separability(real, fake)
    # pairs (r > f): r=1 beats 0 and −1; r=2 beats 0 and −1; r=3 beats all three: 7 of 9
    assert m["heads/0/auc"] == pytest.approx(7 / 9)
    assert m["heads/0/logit_real"] == pytest.approx(2.0) and m["heads/0/logit_fake"] == pytest.approx(0.5)
    assert separability([torch.zeros(4, 3)], [torch.zeros(4, 3)])["heads/auc_mean"] == 0.5  # ties: chance
    assert hinge_chance(4) == 8.0


def test_heads_at_chance_warn_after_patience_and_a_learning_head_resets():
    monitor = HeadsMonitor(num_heads=4, patience=3)
    at_chance = {"loss/D": 7.97, "heads/auc_mean": 0.52}
    assert monitor.update(10, dict(at_chance)) is None
    assert monitor.update(20, dict(at_chance)) is None
    warning = monitor.update(30, dict(at_chance))
    assert warning and "at chance at step 30" in warning and "7.97 of 8" in warning
    assert monitor.update(40, {"loss/D": 6.1, "heads/auc_mean": 0.8}) is None and monitor.run == 0
    metrics = dict(at_chance)
    monitor.update(50, metrics)
    assert metrics["heads/reports_at_chance"] == 1 and metrics["heads/chance_loss_D"] == 8.0


def test_a_metric_logged_on_some_steps_is_averaged_over_those_steps():
    interval = IntervalMetrics()
    interval.add_step({"loss/D": 2.0}, 4, 0.0, 1.0)
    interval.add_step({"loss/D": 4.0, "balance/ratio_theta": 0.5}, 4, 0.0, 1.0)
    summary = interval.summary([[0.0, 2.0, 0.0, 0.0, 1.0]])
    assert summary["loss/D"] == 3.0 and summary["balance/ratio_theta"] == 0.5


def test_the_spec_declares_the_balance():
    base = {"name": "x", "teacher": {"source": "t"}, "data": {"uri": "d"}}
    spec = JobSpec.model_validate(base | {"loss": {"balance": "adaptive", "adv_ratio": 0.3}})
    assert (spec.loss.balance, spec.loss.adv_ratio) == ("adaptive", 0.3)
    with pytest.raises(ValueError, match="loss.balance"):
        JobSpec.model_validate(base | {"loss": {"balance": "adaptive", "lambda_distill": 0}})
    with pytest.raises(ValueError, match="adv_ratio"):
        JobSpec.model_validate(base | {"loss": {"balance": "adaptive", "adv_ratio": 0}})


def _toy(objective: ADDObjective, steps: int = 300) -> dict:
    return run_toy(steps=steps, objective=objective, n_eval=1000)


def _objective(balance: Balance) -> ADDObjective:
    return ADDObjective(
        distill=DistillationLoss("exponential"), r1=R1Penalty(gamma=0.1), guidance_scale=1.0, balance=balance
    )


def test_with_the_adversarial_loss_on_the_heads_learn_and_the_student_beats_distillation_alone():
    """The toy problem, same steps and seed: with L_G on (adaptive balance) the heads' hinge loss falls
    well below its chance value, and the one-step student ends closer to the data than the
    distillation-only student; with L_G off the heads still learn (they see its samples) but the
    student gets nothing from them."""
    both = _toy(_objective(Balance("adaptive", ratio=1.0)))
    distill_only = _toy(_objective(Balance(lambda_adv=0.0)))
    chance = hinge_chance(2)  # two heads
    late = both["history"][-50:]
    loss_d = sum(m["loss/D"] for m in late) / len(late)
    auc = sum(m["heads/auc_mean"] for m in late) / len(late)
    assert loss_d < 0.9 * chance, f"heads stayed near chance: L_D {loss_d:.2f} of {chance}"
    assert auc > 0.6
    w1_both, w1_distill = both["sliced_w1"]["student 1-step"], distill_only["sliced_w1"]["student 1-step"]
    assert w1_both < 0.8 * w1_distill, (w1_both, w1_distill)
    ratios = [m["balance/ratio_x"] for m in both["history"]]
    assert all(math.isclose(r, 1.0, rel_tol=1e-3) for r in ratios if r > 0)


def test_balance_probe_prints_the_balance_per_report_and_scores_the_student(tmp_path):
    """``addctl balance-probe`` on a tiny job: one line per report with the heads against chance and both
    gradients' ratio, then a JSON result appended to --out with the 1- and 4-step scores."""
    import json

    import yaml
    from click.testing import CliRunner

    from orchestrator.cli import main
    from tests.mlflow_server import tiny_job

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tmp_path, f"sqlite:///{tmp_path}/m.db", "probe")))
    out = tmp_path / "probes.jsonl"
    result = CliRunner().invoke(
        main,
        [
            "balance-probe",
            str(job),
            "--steps",
            "3",
            "--images",
            "100",
            "--out",
            str(out),
            "--threads",
            "1",
            "--set",
            "loss.balance=adaptive",
            "--set",
            "loss.adv_ratio=0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sum("heads/auc_mean=" in line and "balance/ratio_theta=" in line for line in result.output.splitlines()) == 3
    (line,) = out.read_text().splitlines()
    probe = json.loads(line)
    assert probe["label"] == "loss.balance=adaptive loss.adv_ratio=0.5"
    assert [r["step"] for r in probe["reports"]] == [1, 2, 3]
    assert all(r["balance/ratio_x"] == pytest.approx(0.5, rel=1e-3) for r in probe["reports"])
    for key in ("fid 1 step", "recall 1 step", "alignment 1 step", "fid 4 step", "loss/D (second half)"):
        assert math.isfinite(probe[key]), key
    # the heads' separability per student timestep, on the held-out batches, in every report
    timesteps = (yaml.safe_load(job.read_text()).get("student") or {}).get("steps", 4)
    for report in probe["reports"]:
        per_s = {k: v for k, v in report.items() if k.startswith("heads/auc s=")}
        assert len(per_s) == timesteps and all(0 <= v <= 1 for v in per_s.values()), report
    assert all("held-out AUC by s:" in line for line in result.output.splitlines() if "heads/auc_mean=" in line)


def test_balance_probe_frozen_student_trains_the_heads_alone(tmp_path):
    """``--frozen-student``, the control: the student takes no step (no student metrics, the same 1-step
    samples as an untrained probe's), while the heads learn (their hinge loss leaves its initial value)."""
    import json

    import yaml
    from click.testing import CliRunner

    from orchestrator.cli import main
    from tests.mlflow_server import tiny_job

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tmp_path, f"sqlite:///{tmp_path}/m.db", "probe")))
    out = tmp_path / "probes.jsonl"
    common = ["balance-probe", str(job), "--images", "100", "--out", str(out), "--threads", "1"]
    for args in (["--steps", "4", "--frozen-student"], ["--steps", "1", "--set", "train.lr_student=1e-30"]):
        result = CliRunner().invoke(main, [*common, *args])
        assert result.exit_code == 0, result.output
    frozen, barely_trained = (json.loads(line) for line in out.read_text().splitlines())
    assert frozen["frozen_student"] and frozen["label"] == "frozen student"
    assert "balance/ratio_theta (second half)" not in frozen and "balance/ratio_theta (second half)" in barely_trained
    # the student never moved: its samples score as those of a student whose one step changed nothing
    assert frozen["fid 1 step"] == pytest.approx(barely_trained["fid 1 step"], rel=1e-3)
    per_s = [k for k in frozen["reports"][-1] if k.startswith("loss/D s=")]
    assert per_s and any(frozen["reports"][-1][k] != frozen["reports"][0][k] for k in per_s)


def test_balance_probe_freezes_a_trained_student_and_restarts_the_heads_on_request(tmp_path):
    """``--freeze-student-at K``: the student of step K is kept (it scores as a probe stopped after K steps)
    while the heads go on learning; ``--fresh-heads`` restarts them there from their initial weights, so
    the reports agree with the kept heads' up to step K and differ after it."""
    import json

    import yaml
    from click.testing import CliRunner

    from orchestrator.cli import main
    from tests.mlflow_server import tiny_job

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tmp_path, f"sqlite:///{tmp_path}/m.db", "probe")))
    out = tmp_path / "probes.jsonl"
    common = ["balance-probe", str(job), "--images", "100", "--out", str(out), "--threads", "1"]
    runs = (
        ["--steps", "3"],
        ["--steps", "4", "--freeze-student-at", "3"],  # the second half mixes student steps and frozen ones
        ["--steps", "4", "--freeze-student-at", "3", "--fresh-heads"],
    )
    for args in runs:
        result = CliRunner().invoke(main, [*common, *args])
        assert result.exit_code == 0, result.output
    stopped, kept, fresh = (json.loads(line) for line in out.read_text().splitlines())
    assert (kept["label"], fresh["label"]) == ("frozen student from step 3", "frozen student from step 3 fresh heads")
    assert kept["fid 1 step"] == pytest.approx(stopped["fid 1 step"], rel=1e-6)
    assert fresh["fid 1 step"] == pytest.approx(stopped["fid 1 step"], rel=1e-6)
    # step 4 trains the heads alone: no student metrics there
    assert all("balance/ratio_theta" in r for r in kept["reports"][:3])
    assert "balance/ratio_theta" not in kept["reports"][3] and "balance/ratio_theta (second half)" in kept
    key = "loss/D s=999" if "loss/D s=999" in kept["reports"][0] else next(
        k for k in kept["reports"][0] if k.startswith("loss/D s=")
    )
    assert [r[key] for r in kept["reports"][:3]] == [r[key] for r in fresh["reports"][:3]]
    assert kept["reports"][3][key] != fresh["reports"][3][key]


def test_balance_probe_refuses_fresh_heads_without_a_frozen_student(tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import main

    job = tmp_path / "job.yaml"
    job.write_text("name: x\n")
    result = CliRunner().invoke(main, ["balance-probe", str(job), "--fresh-heads"])
    assert result.exit_code == 2 and "--freeze-student-at" in result.output
