"""The train state and what builds it: model, optimizer, schedule, and checkpoint compatibility.

Training and inference both build their network and state here, so a restored checkpoint
always meets the model that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from scse_jax import sharding
from scse_jax.errors import CheckpointError
from scse_jax.models.cpu_ops import select_conv3x3
from scse_jax.models.unet import UNet


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training, as one pytree (what a checkpoint holds)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    def variables(self) -> dict[str, Any]:
        """What validation, checkpoints' users and inference run: the parameters' moving
        average where the run keeps one (``train.ema_decay``), else the parameters."""
        average = params_average(self.opt_state)
        return {"params": self.params if average is None else average, "batch_stats": self.batch_stats}


# Fields a resumed run must share with its checkpoint: the network, what it was fed, and which
# patients it trained on (another split would train on the new split's test patients).
MODEL_FIELDS = ("features", "se", "se_reduction", "se_aggregation", "se_positions", "upsample", "deep_supervision")
DATA_FIELDS = (
    "root", "modality", "sequences", "image_size", "num_folds", "fold", "num_val_patients", "split_seed",
    "max_patients", "synthetic_patients", "synthetic_size", "synthetic_slices", "context_slices",
)
# Training fields that shape the checkpoint (the moving average lives in the optimizer state).
TRAIN_FIELDS = ("ema_decay",)
# What a checkpoint saved before a field existed ran with.
FIELD_DEFAULTS = {"context_slices": 0, "ema_decay": 0.0, "deep_supervision": False}


def build_model(model_config: ml_collections.ConfigDict, num_classes: int) -> UNet:
    return UNet(
        num_classes=num_classes,
        features=model_config.features,
        se=model_config.se,
        se_reduction=model_config.se_reduction,
        se_aggregation=model_config.se_aggregation,
        se_positions=tuple(model_config.se_positions),
        upsample=model_config.upsample,
        deep_supervision=model_config.get("deep_supervision", False),
        dtype=jnp.dtype(model_config.compute_dtype),
        conv=select_conv3x3(model_config.get("fast_kernel_gradient", True)),
    )


def learning_rate_schedule(train_config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """The initial rate multiplied by ``decay_rate`` every ``decay_epochs`` epochs (staircase)."""
    return optax.exponential_decay(
        init_value=train_config.learning_rate,
        transition_steps=train_config.decay_epochs * steps_per_epoch,
        decay_rate=train_config.decay_rate,
        staircase=True,
    )


def make_optimizer(train_config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    adam = optax.adam(learning_rate_schedule(train_config, steps_per_epoch))
    decay = train_config.get("ema_decay", 0.0)  # absent from checkpoints saved before it existed
    return optax.chain(adam, average_params(decay)) if decay else adam


class ParamsAverageState(NamedTuple):
    count: jax.Array
    average: Any


def average_params(decay: float) -> optax.GradientTransformation:
    """Keeps an exponential moving average of the parameters the updates lead to (Polyak
    averaging), bias-corrected as Adam's moments are: after t updates it weighs update k by
    ``decay ** (t - k)``, normalised, so the first average is the first updated parameters and
    the random initialisation never enters. Chain it last: it reads the final updates and
    passes them on unchanged."""

    def init(params):
        return ParamsAverageState(count=jnp.zeros((), jnp.int32), average=jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params):
        count = state.count + 1
        new_params = optax.apply_updates(params, updates)
        # The weight the old average keeps so that the result equals the bias-corrected average.
        kept = decay * (1 - decay ** (count - 1.0)) / (1 - decay**count)
        average = jax.tree.map(lambda old, new: kept * old + (1 - kept) * new, state.average, new_params)
        return updates, ParamsAverageState(count=count, average=average)

    return optax.GradientTransformation(init, update)


def params_average(opt_state: Any) -> Any | None:
    """The parameters' moving average kept in ``opt_state`` by `average_params`, or None."""
    found = [
        node for node in jax.tree.leaves(opt_state, is_leaf=lambda node: isinstance(node, ParamsAverageState))
        if isinstance(node, ParamsAverageState)
    ]
    return found[0].average if found else None


def _state_initialiser(model: UNet, tx: optax.GradientTransformation, image_size: int, channels: int):
    def init(rng: jax.Array) -> TrainState:
        variables = model.init(rng, jnp.zeros((1, image_size, image_size, channels), jnp.float32), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
        )

    return init


def abstract_train_state(
    model: UNet, tx: optax.GradientTransformation, *, image_size: int, mesh: jax.sharding.Mesh, channels: int = 1
) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state, computed without any FLOPs."""
    shapes = jax.eval_shape(_state_initialiser(model, tx, image_size, channels), jax.random.key(0))
    replicated = sharding.replicated_sharding(mesh)
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), shapes)


def create_train_state(
    model: UNet,
    tx: optax.GradientTransformation,
    *,
    image_size: int,
    seed: int,
    mesh: jax.sharding.Mesh,
    channels: int = 1,
) -> tuple[TrainState, TrainState]:
    """Initialises a replicated state; returns it and its abstract twin (for restoring).

    Shapes come first from ``jax.eval_shape``; the real initialisation then runs jitted
    straight into its replicated sharding.
    """
    abstract = abstract_train_state(model, tx, image_size=image_size, mesh=mesh, channels=channels)
    shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract)
    # "rbg" keys compile far faster than threefry on the CPU.
    rng = jax.random.key(seed, impl="rbg")
    state = jax.jit(_state_initialiser(model, tx, image_size, channels), out_shardings=shardings)(rng)
    return state, abstract


def check_same_run(meta: dict[str, Any], config: ml_collections.ConfigDict, path: Path) -> None:
    """Refuses to resume a checkpoint of another network, input or patient split."""
    saved = meta.get("config", {})

    def value(config_dict, group: str, field: str):
        found = _jsonable(config_dict.get(group, {}).get(field, FIELD_DEFAULTS.get(field)))
        return str(Path(found).expanduser().resolve()) if field == "root" and found else found

    differences = [
        f"{group}.{field}: checkpoint {value(saved, group, field)!r} vs config {value(config, group, field)!r}"
        for group, fields in (("model", MODEL_FIELDS), ("data", DATA_FIELDS), ("train", TRAIN_FIELDS))
        for field in fields
        if value(saved, group, field) != value(config, group, field)
    ]
    if differences:
        raise CheckpointError(
            f"the checkpoint in {path} was trained with another model, input, split or parameter averaging ({'; '.join(differences)}); "
            "use another --workdir or the same settings"
        )


def _jsonable(value):
    return json.loads(json.dumps(value, default=list))
