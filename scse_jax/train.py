"""Training: the state, the pure jitted steps, and the loop that runs one experiment.

``train_and_evaluate(config, workdir)`` is the whole job that ``launch.py`` starts; a notebook
can import and call it the same way.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from scse_jax import checkpoint, files, losses, postprocess, sharding
from scse_jax.data import pipeline
from scse_jax.data.preprocess import PreparedCase
from scse_jax.errors import ConfigError, RunStopped, TrainingError
from scse_jax.data.run_data import RunData, StreamedRunData, plan_run_data
from scse_jax.models.cpu_ops import CpuConv3x3
from scse_jax.models.layers import Conv3x3
from scse_jax.models.unet import UNet
from scse_jax.run_log import RunLog, progress_line
from scse_jax.state import (
    TrainState,
    build_model,
    check_same_run,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    class_weights: jax.Array,
    *,
    model: UNet,
    tx: optax.GradientTransformation,
    ce_weight: float,
    dice_weight: float,
    boundary_weight: float,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step on a global batch; BatchNorm statistics are over the global batch.

    ``state`` is donated by the jitted wrapper: do not use it after the call.
    """

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        loss, parts = losses.segmentation_loss(
            logits,
            batch["label"],
            class_weights,
            ce_weight=ce_weight,
            dice_weight=dice_weight,
            boundary_weight=boundary_weight,
        )
        return loss, (parts, updates["batch_stats"])

    (_, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, parts


def eval_step(
    variables: dict[str, Any],
    batch: dict[str, jax.Array],
    class_weights: jax.Array,
    *,
    model: UNet,
    ce_weight: float,
    dice_weight: float,
    boundary_weight: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eval-mode prediction (class ids) and the loss over the batch's valid examples."""
    logits = model.apply(variables, batch["image"], train=False)
    _, parts = losses.segmentation_loss(
        logits,
        batch["label"],
        class_weights,
        ce_weight=ce_weight,
        dice_weight=dice_weight,
        boundary_weight=boundary_weight,
        example_mask=batch["valid"],
    )
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), parts


def predict_step(variables: dict[str, Any], images: jax.Array, *, model: UNet, probabilities: bool) -> jax.Array:
    """Eval-mode class ids, or class probabilities when ``probabilities``."""
    logits = model.apply(variables, images, train=False)
    if probabilities:
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def step_compiler_options() -> dict[str, Any] | None:
    """XLA options for the jitted steps: LLVM -O1 on the CPU.

    The convolutions and products run in library calls, so LLVM's -O2 only optimises the
    elementwise fusions, and buys nothing measurable there: train-step compile 18.2 -> 15.0 s
    with the step unchanged (11.3 vs 11.1 s; batch 20, 256 px, 2-core EPYC). Left alone under
    jax_disable_most_optimizations, which asks for less.
    """
    if jax.default_backend() != "cpu" or jax.config.read("jax_disable_most_optimizations"):
        return None
    return {"xla_backend_optimization_level": 1}


def loss_settings(train_config: ml_collections.ConfigDict) -> dict[str, float]:
    """The loss's static weights, as the steps take them."""
    return {
        "ce_weight": train_config.ce_weight,
        "dice_weight": train_config.dice_weight,
        "boundary_weight": train_config.get("boundary_weight", 0.0),
    }


def jit_train_step(model, tx, train_config, mesh):
    replicated = sharding.replicated_sharding(mesh)
    return jax.jit(
        functools.partial(train_step, model=model, tx=tx, **loss_settings(train_config)),
        in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=step_compiler_options(),
    )


def compile_train_step_ahead(train_fn, abstract_state, config, mesh, num_classes: int):
    """Compiles `train_fn` for the run's batches before any exists, so that the first step
    finds it in JAX's cache; returns the compiled step."""
    size, batch = config.data.image_size, config.train.batch_size
    channels = pipeline.input_channels(config.data)
    batch_sharding = sharding.batch_sharding(mesh)
    batch_spec = {
        "image": jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32, sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((batch, size, size), jnp.int32, sharding=batch_sharding),
    }
    weights_spec = jax.ShapeDtypeStruct((num_classes,), jnp.float32, sharding=sharding.replicated_sharding(mesh))
    return train_fn.lower(abstract_state, batch_spec, weights_spec).compile()


# Share of the memory the train step's temporaries may take; the rest holds the data, the
# state and everything else the process keeps.
STEP_MEMORY_SHARE = 0.75


def memory_budget_bytes(device: jax.Device) -> int | None:
    """What one device's program may use: the accelerator's limit, or the host's memory shared
    by its CPU devices (None where unknown). `device` must be one of this process's own: no
    process can ask about another's."""
    if device.process_index != jax.process_index():
        raise ValueError(f"{device} belongs to process {device.process_index}, not this one ({jax.process_index()})")
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu" and hasattr(os, "sysconf"):
        try:
            physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
        return physical // max(1, jax.local_device_count())
    return None


def step_fits_in_memory(compiled, device: jax.Device) -> tuple[bool, float]:
    """Whether a compiled step's temporaries fit in STEP_MEMORY_SHARE of the budget of `device`
    (one of this process's own) and of every other process's; also the temporaries in GiB.

    Every process must answer alike: they all have to run the same program.
    """
    analysis = compiled.memory_analysis()
    budget = memory_budget_bytes(device)
    if analysis is None or budget is None:
        fits, temp_gib = True, math.nan
    else:
        fits, temp_gib = analysis.temp_size_in_bytes <= STEP_MEMORY_SHARE * budget, analysis.temp_size_in_bytes / 2**30
    return sharding.on_every_process(fits), temp_gib


def jit_eval_step(model, train_config, mesh):
    replicated = sharding.replicated_sharding(mesh)
    return jax.jit(
        functools.partial(eval_step, model=model, **loss_settings(train_config)),
        in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
        out_shardings=(sharding.batch_sharding(mesh), replicated),
        compiler_options=step_compiler_options(),
    )


def gather_to_host(array: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host) sharded array, on every host."""
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def fixed_size_batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Cuts arrays into batches of exactly ``batch_size``, padding the last with zeros.

    Every batch carries ``valid`` (1 for real rows, 0 for padding), so one compiled function
    serves any number of slices.
    """
    count = len(next(iter(arrays.values())))
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        batch = {}
        for name, array in arrays.items():
            chunk = array[start:stop]
            if stop - start < batch_size:
                pad = np.zeros((batch_size - (stop - start),) + chunk.shape[1:], chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            batch[name] = chunk
        batch["valid"] = (np.arange(batch_size) < stop - start).astype(np.float32)
        yield batch


def evaluate_cases(
    eval_fn,
    variables: dict[str, Any],
    cases: list[PreparedCase],
    class_weights: jax.Array,
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    class_names: tuple[str, ...],
    largest_component: bool,
    context: int = 0,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, np.ndarray]]:
    """Predicts whole patients, each slice with `context` neighbours on either side as
    channels, maps predictions to the native grid (`postprocess.to_native`) and scores them there.

    Returns the mean loss parts, one row per (case, organ) with the CHAOS metrics and the
    volume analysis, and the native-grid predictions by case key.
    """
    from scse_jax import evaluate

    loss_sums: dict[str, float] = {}
    loss_count = 0.0
    rows, predictions = [], {}
    process_slice = slice(
        jax.process_index() * batch_size // jax.process_count(),
        (jax.process_index() + 1) * batch_size // jax.process_count(),
    )
    for case in cases:
        arrays = {"image": pipeline.with_context(case.images, context), "label": case.labels.astype(np.int32)}
        pieces = []
        for batch in fixed_size_batches(arrays, batch_size):
            local = {name: value[process_slice] for name, value in batch.items()}
            device_batch = sharding.shard_batch(local, mesh)
            predicted, parts = eval_fn(variables, device_batch, class_weights)
            valid = float(batch["valid"].sum())
            for name, value in jax.device_get(parts).items():
                loss_sums[name] = loss_sums.get(name, 0.0) + float(value) * valid
            loss_count += valid
            pieces.append(gather_to_host(predicted)[: int(valid)])
        native = postprocess.to_native(
            np.concatenate(pieces),
            case.native_shape[1:],
            num_classes=len(class_names),
            largest_component=largest_component,
        )
        predictions[case.case_key] = native
        rows += [{"case": case.case_key, **row} for row in evaluate.score_prediction(native, case, class_names)]
    mean_losses = {name: total / max(loss_count, 1.0) for name, total in loss_sums.items()}
    return mean_losses, rows, predictions


def summarise_rows(rows: list[dict[str, Any]], class_names: tuple[str, ...]) -> dict[str, Any]:
    """Per-organ means of Dice, Jaccard and predicted / true volume over cases; the means of
    Dice and Jaccard over organs."""
    summary: dict[str, Any] = {"dice": {}, "jaccard": {}, "volume_ratio": {}}
    for organ in class_names[1:]:
        organ_rows = [row for row in rows if row["organ"] == organ]
        for metric in summary:
            summary[metric][organ] = float(np.mean([row[metric] for row in organ_rows])) if organ_rows else math.nan
    summary["dice_mean"] = float(np.nanmean(list(summary["dice"].values())))
    summary["jaccard_mean"] = float(np.nanmean(list(summary["jaccard"].values())))
    return summary


def dice_table(summary: dict[str, Any]) -> str:
    """A small text table of per-organ validation Dice and Jaccard."""
    lines = [f"{'organ':<14}{'dice':>8}{'jaccard':>10}"]
    for organ, dice in summary["dice"].items():
        lines.append(f"{organ:<14}{dice:>8.3f}{summary['jaccard'][organ]:>10.3f}")
    lines.append(f"{'mean':<14}{summary['dice_mean']:>8.3f}{summary['jaccard_mean']:>10.3f}")
    return "\n".join(lines)


def use_compilation_cache(data_config: ml_collections.ConfigDict) -> None:
    """Keeps compiled steps beside the prepared data, so that a resumed or repeated run skips
    compiling (unless JAX_COMPILATION_CACHE_DIR names another place)."""
    from scse_jax.data.run_data import cache_root

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(cache_root(data_config) / "xla"))


def validate_config(config: ml_collections.ConfigDict, *, device_count: int | None = None) -> None:
    """Checks values before any work starts; raises ConfigError naming the field."""
    device_count = jax.device_count() if device_count is None else device_count

    def need(condition: bool, field: str, message: str) -> None:
        if not condition:
            raise ConfigError(f"config.{field}: {message}")

    def need_int(value, field):
        need(isinstance(value, int) and not isinstance(value, bool), field, f"must be an integer, got {value!r}")

    for field in (
        "data.image_size", "data.context_slices", "train.batch_size", "train.num_epochs", "eval.batch_size",
        "model.features",
    ):
        group, name = field.split(".")
        need_int(config[group][name], field)
    need(config.data.context_slices >= 0, "data.context_slices", f"must be >= 0, got {config.data.context_slices}")
    size = config.data.image_size
    need(size >= 16 and size % 16 == 0, "data.image_size", f"{size} must be a positive multiple of 16 (four 2x poolings)")
    need(config.train.num_epochs > 0, "train.num_epochs", f"must be > 0, got {config.train.num_epochs}")
    need(config.model.features > 0, "model.features", f"must be > 0, got {config.model.features}")
    for field in ("train.batch_size", "eval.batch_size"):
        group, name = field.split(".")
        value = config[group][name]
        need(
            value > 0 and value % device_count == 0,
            field,
            f"{value} must be a positive multiple of the device count ({device_count})",
        )
    need(config.train.learning_rate > 0, "train.learning_rate", "must be > 0")
    need(config.train.decay_epochs > 0, "train.decay_epochs", "must be > 0")
    need(
        config.train.class_weighting in pipeline.CLASS_WEIGHTINGS,
        "train.class_weighting",
        f"{config.train.class_weighting!r} is not one of {'|'.join(pipeline.CLASS_WEIGHTINGS)}",
    )
    need(config.train.boundary_weight >= 0, "train.boundary_weight", "must be >= 0")
    need(config.data.modality in ("CT", "MR"), "data.modality", f"{config.data.modality!r} is not 'CT' or 'MR'")
    need(config.model.se in ("none", "cse", "sse", "scse"), "model.se", f"{config.model.se!r} is not none|cse|sse|scse")
    need(
        config.model.se_aggregation in ("max", "add", "mul"),
        "model.se_aggregation",
        f"{config.model.se_aggregation!r} is not max|add|mul",
    )
    need(config.model.upsample in ("bilinear", "transpose"), "model.upsample", f"{config.model.upsample!r}")
    need(
        config.model.compute_dtype in ("float32", "bfloat16"),
        "model.compute_dtype",
        f"{config.model.compute_dtype!r} is not float32|bfloat16",
    )
    need(0 <= config.data.fold < max(config.data.num_folds, 1), "data.fold", "must be in [0, num_folds)")
    need(config.checkpoint.every_epochs > 0, "checkpoint.every_epochs", "must be > 0")
    need(config.checkpoint.keep_latest > 0, "checkpoint.keep_latest", "must be > 0")
    if config.data.root:
        need(Path(config.data.root).expanduser().exists(), "data.root", f"{config.data.root} does not exist")


class _StopRequests:
    """Turns SIGTERM/SIGINT into a flag checked between steps."""

    def __init__(self):
        self.signal_name: str | None = None

    def __call__(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        if threading_main():
            previous = {sig: signal.signal(sig, self) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield self
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        else:
            yield self


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    files.write_text(workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains (or resumes) one run in ``workdir`` and validates it every epoch.

    Returns the final validation summary (per-organ Dice and Jaccard and their means). Raises
    RunStopped after saving when SIGTERM/SIGINT arrives before the last epoch is done, and
    ConfigError when another process trains in ``workdir`` (see `files.WorkdirLock`).
    """
    with contextlib.ExitStack() as held:  # the workdir's lock, from when the workdir exists
        return _train_and_evaluate(config, workdir, held)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, held: contextlib.ExitStack
) -> dict[str, Any]:
    workdir = Path(workdir).expanduser()
    sharding.initialize_distributed(
        config.distributed.coordinator_address or None,
        config.distributed.num_processes or None,
        None if config.distributed.process_id < 0 else config.distributed.process_id,
    )
    validate_config(config)
    mesh = sharding.make_data_mesh()
    is_chief = jax.process_index() == 0
    if is_chief:
        print(
            f"Training on {jax.device_count()} {jax.default_backend()} device(s) in "
            f"{jax.process_count()} process(es), global batch {config.train.batch_size}",
            flush=True,
        )

    plan = plan_run_data(config)
    class_names = plan.class_names
    num_classes = len(class_names)
    steps_per_epoch = pipeline.steps_per_epoch(plan.num_train_slices(), config.train.batch_size)
    total_steps = steps_per_epoch * config.train.num_epochs

    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--workdir {workdir}: cannot create it ({error.strerror or error})") from error
    held.enter_context(files.WorkdirLock(workdir, process=jax.process_index()))
    ckpts = checkpoint.Checkpoints(workdir / "checkpoints", keep_latest=config.checkpoint.keep_latest)
    latest = ckpts.latest_step()
    if latest is not None:
        meta = ckpts.restore_meta(latest)
        check_same_run(meta, config, ckpts.directory)
        if meta.get("steps_per_epoch") != steps_per_epoch:
            raise ConfigError(
                f"the run in {workdir} has {meta.get('steps_per_epoch')} steps per epoch, this config "
                f"{steps_per_epoch}: the data or batch size changed; use another --workdir"
            )

    model = build_model(config.model, num_classes)
    tx = make_optimizer(config.train, steps_per_epoch)
    # Decoding the images (slow on a cold cache) overlaps initialising and compiling the model,
    # and, with data.stream_first_epoch, the first epoch's training steps.
    streamed = StreamedRunData(plan, config)
    state, abstract_state = create_train_state(
        model, tx, image_size=config.data.image_size, seed=config.train.seed, mesh=mesh,
        channels=pipeline.input_channels(config.data),
    )
    train_fn = jit_train_step(model, tx, config.train, mesh)
    compiled = compile_train_step_ahead(train_fn, abstract_state, config, mesh, num_classes)
    fits, temp_gib = step_fits_in_memory(compiled, mesh.local_devices[0])
    if model.conv is CpuConv3x3 and not fits:
        print(
            f"The train step's fast kernel gradient needs {temp_gib:.1f} GiB of temporaries per device, more "
            f"than this machine can spare: using XLA's kernel gradient (model.fast_kernel_gradient=False)",
            flush=True,
        )
        model = model.clone(conv=Conv3x3)
        train_fn = jit_train_step(model, tx, config.train, mesh)
        compile_train_step_ahead(train_fn, abstract_state, config, mesh, num_classes)
    class_weights = jax.device_put(
        jnp.asarray(streamed.class_weights(), jnp.float32), sharding.replicated_sharding(mesh)
    )
    schedule = learning_rate_schedule(config.train, steps_per_epoch)

    partial = {"loss_sum": 0.0, "loss_count": 0}
    if latest is not None:
        state, meta = ckpts.restore(latest, abstract_state)
        partial = meta.get("partial_epoch", partial)
        print(f"Resuming from step {latest} (epoch {latest // steps_per_epoch}) in {ckpts.directory}", flush=True)
    log = RunLog(workdir, enabled=is_chief)  # only now: a refused checkpoint leaves the workdir untouched
    if is_chief:
        _save_config(config, workdir)
    start_step = int(jax.device_get(state.step))
    log.roll_back_to(start_step // steps_per_epoch)

    eval_fn = jit_eval_step(model, config.train, mesh)

    def meta_for(step: int, val_dice: float | None, partial_epoch: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": step,
            "epoch": step // steps_per_epoch,
            "steps_per_epoch": steps_per_epoch,
            "val_dice": val_dice,
            "partial_epoch": partial_epoch,
            "class_names": list(class_names),
            "config": json.loads(config.to_json_best_effort()),
        }

    summary: dict[str, Any] | None = None
    val_predictions: dict[str, np.ndarray] = {}
    stop = _StopRequests()
    step = start_step
    with stop.installed():
        first_epoch = start_step // steps_per_epoch
        for epoch in range(first_epoch, config.train.num_epochs):
            skip = step - epoch * steps_per_epoch
            host_batches = pipeline.iterate_batches(
                streamed.train,
                batch_size=config.train.batch_size,
                epoch=epoch,
                seed=config.train.seed,
                augment=(
                    functools.partial(pipeline.augment_batch, modality=config.data.modality)
                    if config.data.augment
                    else None
                ),
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                first_step=skip,
                order=streamed.first_epoch_order() if epoch == 0 else None,
            )
            step_losses: list[tuple[int, dict[str, jax.Array]]] = []
            epoch_start = time.perf_counter()
            window_start, window_images = time.perf_counter(), 0
            for batch in sharding.device_batches(host_batches, mesh):
                state, parts = train_fn(state, batch, class_weights)
                step += 1
                step_losses.append((step, parts))
                window_images += config.train.batch_size
                if step % config.train.log_every_steps == 0 or step % steps_per_epoch == 0:
                    _absorb_losses(step_losses, partial)
                    rate = window_images / max(time.perf_counter() - window_start, 1e-9)
                    mean_loss = partial["loss_sum"] / max(partial["loss_count"], 1)
                    lr = float(schedule(step - 1))
                    print(
                        progress_line(
                            step, total_steps, steps_per_epoch, mean_loss, rate, config.train.batch_size, lr
                        ),
                        flush=True,
                    )
                    log.scalars(
                        step, {"train/loss_running": mean_loss, "train/images_per_s": rate, "train/learning_rate": lr}
                    )
                    window_start, window_images = time.perf_counter(), 0
                if stop.signal_name:
                    break
            _absorb_losses(step_losses, partial)

            # A stop in the epoch's last step lets the epoch end normally (records, validation,
            # checkpoint), so that its records are never half written.
            if stop.signal_name and step % steps_per_epoch:
                ckpts.save(step, state, meta_for(step, None, partial))
                raise _stopped(stop.signal_name, step, ckpts, log, workdir)

            epoch_number = epoch + 1
            train_record = {
                "loss": partial["loss_sum"] / max(partial["loss_count"], 1),
                "learning_rate": float(schedule(step - 1)),
                "images_per_s": partial["loss_count"] * config.train.batch_size
                / max(time.perf_counter() - epoch_start, 1e-9),
            }
            for name in ("cross_entropy", "dice_loss"):
                train_record[name] = partial.get(name + "_sum", 0.0) / max(partial["loss_count"], 1)
            log.record("train", epoch_number, step, train_record)
            partial = {"loss_sum": 0.0, "loss_count": 0}

            data: RunData = streamed.result()
            val_dice = None
            if data.val and (epoch_number % config.eval.every_epochs == 0 or epoch_number == config.train.num_epochs):
                val_losses, rows, val_predictions = evaluate_cases(
                    eval_fn, state.variables(), data.val, class_weights,
                    batch_size=config.eval.batch_size, mesh=mesh, class_names=class_names,
                    largest_component=config.eval.largest_component, context=config.data.context_slices,
                )
                summary = summarise_rows(rows, class_names)
                val_dice = summary["dice_mean"]
                log.record("val", epoch_number, step, {**val_losses, **summary})
                print(f"epoch {epoch_number} validation: dice {val_dice:.3f} "
                      + " ".join(f"{k} {v:.3f}" for k, v in summary["dice"].items())
                      + "; predicted/true volume "
                      + " ".join(f"{k} {v:.2f}" for k, v in summary["volume_ratio"].items()), flush=True)
            saved = epoch_number % config.checkpoint.every_epochs == 0 or epoch_number == config.train.num_epochs
            if saved:
                ckpts.save(step, state, meta_for(step, val_dice, partial))
            if stop.signal_name and epoch_number < config.train.num_epochs:
                if not saved:
                    ckpts.save(step, state, meta_for(step, val_dice, partial))
                raise _stopped(stop.signal_name, step, ckpts, log, workdir)

    ckpts.close()
    data = streamed.result()
    if summary is None and data.val:
        _, rows, val_predictions = evaluate_cases(
            eval_fn, state.variables(), data.val, class_weights,
            batch_size=config.eval.batch_size, mesh=mesh, class_names=class_names,
            largest_component=config.eval.largest_component, context=config.data.context_slices,
        )
        summary = summarise_rows(rows, class_names)
    if is_chief:
        from scse_jax import plots

        plots.plot_loss_curves(log.read_records(), workdir / "loss_curves.png")
        shown = data.val[: config.eval.num_overlays]
        if shown:
            plots.save_validation_overlays(shown, val_predictions, workdir / "overlays")
    log.close()
    if summary:
        print("Validation (native resolution, mean over validation patients):")
        print(dice_table(summary), flush=True)
    return summary or {}


def _stopped(signal_name: str, step: int, ckpts: checkpoint.Checkpoints, log: RunLog, workdir: Path) -> RunStopped:
    """Closes the run after a SIGTERM/SIGINT whose checkpoint is saved; the error says how to resume."""
    log.close()
    ckpts.close()
    return RunStopped(
        f"{signal_name} received: saved step {step} in {ckpts.directory}. Resume with the same "
        f"command and --workdir={workdir}"
    )


def _absorb_losses(step_losses: list[tuple[int, dict[str, jax.Array]]], partial: dict[str, Any]) -> None:
    """Moves pending per-step losses to the host; a non-finite one stops the run."""
    if not step_losses:
        return
    fetched = jax.device_get([parts for _, parts in step_losses])
    for (step, _), parts in zip(step_losses, fetched):
        if not np.isfinite(parts["loss"]):
            raise TrainingError(
                f"non-finite loss ({float(parts['loss'])}) at step {step}; the last good checkpoint is kept. "
                "Lower train.learning_rate or check the data."
            )
        partial["loss_sum"] += float(parts["loss"])
        partial["loss_count"] += 1
        for name in ("cross_entropy", "dice_loss"):
            partial[name + "_sum"] = partial.get(name + "_sum", 0.0) + float(parts[name])
    step_losses.clear()
