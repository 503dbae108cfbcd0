"""Config files and the one override syntax, --config.field=value, shared by every command."""

import pytest

from scse_jax import experiment
from scse_jax.config_files import apply_overrides, load_config_file
from scse_jax.errors import ConfigError


def test_overrides_parse_by_the_fields_type_as_launch_does():
    config = load_config_file("configs/mr_scse.py")
    apply_overrides(config, [
        "--config.data.root=/data/chaos", '--config.data.sequences=("T1DUAL_InPhase",)',
        "--config.train.num_epochs=2", "--config.data.augment=false", "--config.train.learning_rate=1e-3",
    ])
    assert config.data.root == "/data/chaos" and config.data.sequences == ("T1DUAL_InPhase",)
    assert config.train.num_epochs == 2 and config.data.augment is False and config.train.learning_rate == 1e-3


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.data.nope=1", "--config.data.nope: no such config field"),
        ("--config.train.num_epochs=two", "--config.train.num_epochs=two"),
        ("data.root=/x", "expected --config.group.field=value"),
        ("--config.data.root", "expected --config.group.field=value"),
    ],
)
def test_a_bad_override_is_one_config_error_naming_it(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_config_file("configs/default.py"), [override])


def test_a_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "nope.py")


def test_experiment_takes_the_same_overrides_for_every_config(tmp_path):
    overrides = [f"--config.data.root={tmp_path}", "--config.model.features=8", "--config.train.batch_size=8"]
    configs = experiment.load_study_configs(["configs/mr_unet.py", "configs/mr_scse.py"], overrides, 3)
    assert {name: (c.data.root, c.model.features, c.data.num_folds) for name, c in configs.items()} == {
        "mr_unet": (str(tmp_path), 8, 3), "mr_scse": (str(tmp_path), 8, 3)
    }


def test_experiment_refuses_an_argument_that_is_no_override(capsys):
    with pytest.raises(SystemExit):
        experiment.main(["--config", "configs/mr_unet.py", "--out", "x", "--set", "data.root=/x"])
    assert "unrecognized arguments: --set data.root=/x" in capsys.readouterr().err


def _flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("unet, scse", [("mr_unet", "mr_scse"), ("mr_unet_cpu", "mr_scse_cpu"), ("ct_unet", "ct_scse")])
def test_the_study_twins_differ_only_in_the_se_block(unet, scse):
    import importlib

    a = _flat(importlib.import_module(f"configs.{unet}").get_config())
    b = _flat(importlib.import_module(f"configs.{scse}").get_config())
    assert {key for key in a if a[key] != b[key]} == {"model.se"}
    assert (a["model.se"], b["model.se"]) == ("none", "scse")


def test_the_cpu_recipe_trains_with_gin_and_the_quickstart_with_the_jitter_it_was_measured_with():
    from configs import mr_scse_cpu, quickstart

    assert mr_scse_cpu.get_config().data.intensity_augmentation == "gin"
    assert quickstart.get_config().data.intensity_augmentation == "jitter"


def test_the_cpu_recipe_trains_on_every_non_test_patient_and_the_quickstart_validates_on_one():
    from configs import mr_scse_cpu, quickstart

    recipe = mr_scse_cpu.get_config()
    assert (recipe.data.num_val_patients, recipe.eval.checkpoint) == (0, "latest")
    assert recipe.model.deep_supervision and not quickstart.get_config().model.deep_supervision
    assert quickstart.get_config().data.num_val_patients == 1


def test_the_cpu_recipe_has_fixed_length_epochs_and_the_quickstart_one_pass_epochs():
    from configs import mr_scse_cpu, mr_unet_cpu, quickstart

    recipe = mr_scse_cpu.get_config()
    assert recipe.train.steps_per_epoch > 0 and mr_unet_cpu.get_config().train.steps_per_epoch == recipe.train.steps_per_epoch
    assert quickstart.get_config().train.steps_per_epoch == 0
