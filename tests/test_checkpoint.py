"""Checkpoints of one model refuse to load into another, naming the folder and what to do."""

import pytest
import torch
from torch import nn

from workers.train.checkpoint import (
    IncompatibleCheckpoint,
    TrainState,
    apply_model_state,
    load_checkpoint,
    model_state,
    save_checkpoint,
)


def parts(head_in: int):
    torch.manual_seed(0)
    student, heads = nn.Linear(3, 3), nn.Linear(head_in, 1)
    return student, torch.optim.AdamW(student.parameters()), heads, torch.optim.AdamW(heads.parameters())


def test_a_checkpoint_loads_back_into_the_same_model(tmp_path):
    student, opt_g, heads, opt_d = parts(4)
    save_checkpoint(tmp_path / "c", model_state(student, opt_g, heads, opt_d, None), TrainState(step=7), 0)
    again = parts(4)
    with torch.no_grad():
        again[2].weight.zero_()
    state = model_state(*again, None)
    assert load_checkpoint(tmp_path / "c", state, 0, 1).step == 7
    apply_model_state(state, *again)
    assert torch.equal(again[2].weight, heads.weight)


def test_a_checkpoint_of_other_heads_is_refused_naming_it(tmp_path):
    """The main job's heads grew a channel (discriminator.minibatch_std) while a run's checkpoint stayed."""
    save_checkpoint(tmp_path / "c", model_state(*parts(4), None), TrainState(step=7), 0)
    with pytest.raises(IncompatibleCheckpoint, match="holds a different model") as err:
        load_checkpoint(tmp_path / "c", model_state(*parts(5), None), 0, 1)
    assert str(tmp_path / "c") in str(err.value) and "start afresh" in str(err.value)
