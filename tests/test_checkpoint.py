"""Which checkpoint a run's users get: best, latest, a step, or the run's own eval.checkpoint."""

import numpy as np
import pytest

from scse_jax.checkpoint import Checkpoints
from scse_jax.errors import CheckpointError


def _run_with_steps(directory, eval_settings, val_dice=(0.5, 0.9, 0.6)):
    """Checkpoints of steps 1, 2, 3 scoring ``val_dice``, whose config has ``eval_settings``."""
    ckpts = Checkpoints(directory, keep_latest=3)
    for step, dice in enumerate(val_dice, start=1):
        config = {"eval": eval_settings} if eval_settings is not None else {}
        ckpts.save(step, {"w": np.full(4, step, np.float32)}, {"step": step, "config": config, "val_dice": dice})
    return ckpts


@pytest.mark.parametrize(
    "eval_settings, expected",
    [({"checkpoint": "latest"}, 3), ({"checkpoint": "best"}, 2), (None, 2)],  # None: a run from before the field
)
def test_without_a_choice_the_run_s_own_eval_checkpoint_is_used(tmp_path, eval_settings, expected):
    ckpts = _run_with_steps(tmp_path / "checkpoints", eval_settings)
    try:
        assert ckpts.chosen_step(None) == expected
        assert (ckpts.chosen_step("best"), ckpts.chosen_step("latest"), ckpts.chosen_step("1")) == (2, 3, 1)
    finally:
        ckpts.close()


def test_a_missing_step_or_an_unknown_choice_is_a_clear_error(tmp_path):
    ckpts = _run_with_steps(tmp_path / "checkpoints", {"checkpoint": "best"})
    try:
        with pytest.raises(CheckpointError, match=r"no checkpoint 7 in .*; there are \[1, 2, 3\]"):
            ckpts.chosen_step("7")
        with pytest.raises(CheckpointError, match="checkpoint 'middle': expected latest, best or a step number"):
            ckpts.chosen_step("middle")
    finally:
        ckpts.close()
    empty = Checkpoints(tmp_path / "empty")
    try:
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            empty.chosen_step(None)
    finally:
        empty.close()
