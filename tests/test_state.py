"""The train state's builders and the checkpoint-compatibility check, without training."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from configs import default
from scse_jax import sharding
from scse_jax.errors import CheckpointError
from scse_jax.state import abstract_train_state, build_model, check_same_run, make_optimizer

REPO = Path(__file__).resolve().parents[1]


def saved_meta(config):
    return {"config": json.loads(config.to_json_best_effort())}


def test_the_same_config_is_the_same_run_and_a_missing_new_field_takes_its_old_default(tmp_path):
    config = default.get_config()
    check_same_run(saved_meta(config), config, tmp_path)
    older = saved_meta(config)
    del older["config"]["data"]["context_slices"]  # saved before the field existed
    check_same_run(older, config, tmp_path)
    config.data.context_slices = 1
    with pytest.raises(CheckpointError, match=r"data.context_slices: checkpoint 0 vs config 1"):
        check_same_run(older, config, tmp_path)


def test_fields_outside_the_model_and_data_may_change_on_resume(tmp_path):
    config = default.get_config()
    meta = saved_meta(config)
    config.train.num_epochs += 5
    config.eval.largest_component = not config.eval.largest_component
    check_same_run(meta, config, tmp_path)
    config.model.se = "none" if config.model.se != "none" else "scse"
    with pytest.raises(CheckpointError, match=f"in {tmp_path} was trained with another model"):
        check_same_run(meta, config, tmp_path)


def test_abstract_state_has_the_input_channels_and_no_values():
    config = default.get_config()
    config.model.features = 4
    model = build_model(config.model, 5)
    tx = make_optimizer(config.train, steps_per_epoch=2)
    mesh = sharding.make_data_mesh()
    abstract = abstract_train_state(model, tx, image_size=32, mesh=mesh, channels=3)
    kernel = abstract.params["enc1"]["conv1"]["kernel"]
    assert isinstance(kernel, jax.ShapeDtypeStruct) and kernel.shape[-2] == 3
    assert abstract.step.shape == ()


def test_inference_does_not_import_the_trainer():
    code = "import sys, scse_jax.inference, scse_jax.evaluate, scse_jax.predict; print('scse_jax.train' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
