"""The train state's builders and the checkpoint-compatibility check, without training."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from scse_jax import sharding
from scse_jax.errors import CheckpointError
from scse_jax.state import (
    TrainState, abstract_train_state, average_params, build_model, check_same_run, make_optimizer, params_average,
)

REPO = Path(__file__).resolve().parents[1]


def saved_meta(config):
    return {"config": json.loads(config.to_json_best_effort())}


def test_the_same_config_is_the_same_run_and_a_missing_new_field_takes_its_old_default(tmp_path):
    config = default.get_config()
    check_same_run(saved_meta(config), config, tmp_path)
    older = saved_meta(config)
    del older["config"]["data"]["context_slices"]  # saved before the fields existed
    del older["config"]["train"]["ema_decay"]
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


def test_resume_refuses_to_switch_parameter_averaging(tmp_path):
    config = default.get_config()
    meta = saved_meta(config)
    config.train.ema_decay = 0.99
    with pytest.raises(CheckpointError, match=r"train.ema_decay: checkpoint 0.0 vs config 0.99"):
        check_same_run(meta, config, tmp_path)


def test_the_parameter_average_is_the_bias_corrected_exponential_average_of_the_updated_parameters():
    decay = 0.8
    tx = optax.chain(optax.sgd(1.0), average_params(decay))
    params = {"w": jnp.array([0.0, 10.0])}
    opt_state = tx.init(params)
    seen = []
    for gradient in ([1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]):
        updates, opt_state = tx.update({"w": jnp.array(gradient)}, opt_state, params)
        np.testing.assert_allclose(updates["w"], -np.array(gradient))  # passed on unchanged
        params = optax.apply_updates(params, updates)
        seen.append(np.asarray(params["w"]))
    weights = decay ** np.arange(len(seen))[::-1]
    expected = (weights[:, None] * np.stack(seen)).sum(0) / weights.sum()
    np.testing.assert_allclose(params_average(opt_state)["w"], expected, rtol=1e-6)
    state = TrainState(step=jnp.int32(3), params=params, batch_stats={}, opt_state=opt_state)
    np.testing.assert_allclose(state.variables()["params"]["w"], expected, rtol=1e-6)


def test_without_averaging_the_state_runs_its_parameters():
    config = default.get_config()
    assert config.train.ema_decay == 0.0
    tx = make_optimizer(config.train, steps_per_epoch=2)
    params = {"w": jnp.ones(2)}
    opt_state = tx.init(params)
    assert params_average(opt_state) is None
    assert TrainState(step=jnp.int32(0), params=params, batch_stats={}, opt_state=opt_state).variables()["params"] is params


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
