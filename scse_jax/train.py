"""Training: the pure jitted train step and the loop that runs one experiment.

``train_and_evaluate(config, workdir)`` is the whole job that ``launch.py`` starts; a notebook
can import and call it the same way. The state and the model come from `state`, validation
predicts through `prediction.Predictor` and scores through `evaluate.score_cases`, as
``evaluate --checkpoint`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shlex
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from scse_jax import checkpoint, cpu_layout, evaluate, files, hugepages, losses, postprocess, sharding
from scse_jax.compilation import step_compiler_options, step_fits_in_memory
from scse_jax.data import intensity, pipeline
from scse_jax.data.preprocess import PreparedCase
from scse_jax.data.run_data import StreamedRunData, plan_run_data
from scse_jax.errors import ConfigError, RunStopped, TrainingError
from scse_jax.models.se import AGGREGATIONS
from scse_jax.models.unet import DEEP_SUPERVISION, SE_KINDS, SE_POSITIONS, UPSAMPLINGS, UNet, auxiliary_logits
from scse_jax.prediction import Predictor
from scse_jax.run_log import RunLog, progress_line
from scse_jax.state import TrainState, build_model, check_same_run, create_train_state, learning_rate_schedule, make_optimizer


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    class_weights: jax.Array,
    *,
    model: UNet,
    tx: optax.GradientTransformation,
    **loss_weights: float,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step on a global batch; BatchNorm statistics are over the global batch.

    ``loss_weights`` are `losses.segmentation_loss`'s weights (`loss_settings`). ``state`` is
    donated by the jitted wrapper: do not use it after the call.
    """

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats", DEEP_SUPERVISION],
        )
        loss, parts = losses.deep_supervision_loss(
            [logits, *auxiliary_logits(updates)], batch["label"], class_weights,
            shares=batch.get("label_shares"), **loss_weights,
        )
        return loss, (parts, updates["batch_stats"])

    (_, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, parts


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
    if config.data.get("soft_labels", False):
        batch_spec["label_shares"] = jax.ShapeDtypeStruct(
            (batch, size, size, num_classes), jnp.float32, sharding=batch_sharding
        )
    weights_spec = jax.ShapeDtypeStruct((num_classes,), jnp.float32, sharding=sharding.replicated_sharding(mesh))
    return train_fn.lower(abstract_state, batch_spec, weights_spec).compile()


def compile_train_step(config, num_classes: int, tx, abstract_state, mesh):
    """The model and its jitted train step, compiled ahead; XLA's kernel gradient where the fast
    one's temporaries would not fit in the device's memory."""
    model_config = config.model
    model = build_model(model_config, num_classes)
    train_fn = jit_train_step(model, tx, config.train, mesh)
    compiled = compile_train_step_ahead(train_fn, abstract_state, config, mesh, num_classes)
    fits, temp_gib = step_fits_in_memory(compiled, mesh.local_devices[0])
    if model_config.get("fast_kernel_gradient", True) and not fits:
        print(
            f"The train step's fast kernel gradient needs {temp_gib:.1f} GiB of temporaries per device, more "
            f"than this machine can spare: using XLA's kernel gradient (model.fast_kernel_gradient=False)",
            flush=True,
        )
        model_config = ml_collections.ConfigDict(model_config.to_dict())
        model_config.fast_kernel_gradient = False
        model = build_model(model_config, num_classes)
        train_fn = jit_train_step(model, tx, config.train, mesh)
        compile_train_step_ahead(train_fn, abstract_state, config, mesh, num_classes)
    return model, train_fn


def is_due(count: int, every: int, *, last: bool = False) -> bool:
    """Whether a periodic action (log, validation, checkpoint) runs now: every ``every`` counts,
    and at the ``last`` one."""
    return last or count % every == 0


@dataclasses.dataclass
class RunningLosses:
    """The training loss and its parts summed over the steps of the epoch so far.

    A checkpoint taken inside an epoch keeps them (`as_meta`), so that the resumed epoch
    reports the mean over all of its steps.
    """

    loss_sum: float = 0.0
    loss_count: int = 0
    cross_entropy_sum: float = 0.0
    dice_loss_sum: float = 0.0

    @classmethod
    def from_meta(cls, saved: dict[str, Any] | None) -> "RunningLosses":
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in (saved or {}).items() if name in fields})

    def as_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def absorb(self, pending: list[tuple[int, dict[str, jax.Array]]]) -> None:
        """Moves pending per-step losses to the host and adds them; a non-finite one stops the run."""
        if not pending:
            return
        fetched = jax.device_get([parts for _, parts in pending])
        for (step, _), parts in zip(pending, fetched):
            optimised = parts.get("deep_supervision_loss", parts["loss"])
            if not np.isfinite(optimised):
                raise TrainingError(
                    f"non-finite loss ({float(optimised)}) at step {step}; the last good checkpoint is kept. "
                    "Lower train.learning_rate or check the data."
                )
            self.loss_sum += float(parts["loss"])
            self.loss_count += 1
            self.cross_entropy_sum += float(parts["cross_entropy"])
            self.dice_loss_sum += float(parts["dice_loss"])
        pending.clear()

    def means(self) -> dict[str, float]:
        count = max(self.loss_count, 1)
        return {
            "loss": self.loss_sum / count,
            "cross_entropy": self.cross_entropy_sum / count,
            "dice_loss": self.dice_loss_sum / count,
        }


def validate(
    predictor: Predictor,
    variables: dict[str, Any],
    cases: list[PreparedCase],
    class_weights: jax.Array,
    *,
    loss_weights: dict[str, float],
    class_names: tuple[str, ...],
    largest_component: bool,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, np.ndarray]]:
    """Predicts whole validation patients, maps the predictions to the native grid and scores
    them there, as ``evaluate --checkpoint`` does.

    Returns the loss parts as means of batch losses weighted by each batch's slices
    (`Predictor.predict_with_loss`: they depend on eval.batch_size), one row per (case, organ)
    with the CHAOS metrics and the volume analysis, and the native-grid predictions by case key.
    """
    loss_sums: dict[str, float] = {}
    slices = 0

    def predict_native(case: PreparedCase) -> np.ndarray:
        nonlocal slices
        probabilities, sums, count = predictor.predict_with_loss(
            variables, case.images, case.labels, class_weights, loss_weights
        )
        for name, total in sums.items():
            loss_sums[name] = loss_sums.get(name, 0.0) + total
        slices += count
        return postprocess.to_native(probabilities, case.native_shape[1:], largest_component=largest_component)

    rows, predictions = evaluate.score_cases(cases, predict_native, class_names)
    return {name: total / max(slices, 1) for name, total in loss_sums.items()}, rows, predictions


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
    fixed_steps = config.train.get("steps_per_epoch", 0)
    need_int(fixed_steps, "train.steps_per_epoch")
    need(fixed_steps >= 0, "train.steps_per_epoch", f"must be >= 0 (0: one pass over the slices), got {fixed_steps}")
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
    need(config.train.decay_rate > 0, "train.decay_rate", f"must be > 0, got {config.train.decay_rate}")
    ema_decay = config.train.get("ema_decay", 0.0)
    need(0 <= ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {ema_decay}")
    need(config.train.log_every_steps > 0, "train.log_every_steps", f"must be > 0, got {config.train.log_every_steps}")
    need(
        config.train.class_weighting in pipeline.CLASS_WEIGHTINGS,
        "train.class_weighting",
        f"{config.train.class_weighting!r} is not one of {'|'.join(pipeline.CLASS_WEIGHTINGS)}",
    )
    need(config.train.boundary_weight >= 0, "train.boundary_weight", "must be >= 0")
    intensity_set = config.data.get("intensity_augmentation", "jitter")
    need(
        intensity_set in intensity.INTENSITY_AUGMENTATIONS,
        "data.intensity_augmentation",
        f"{intensity_set!r} is not one of {'|'.join(intensity.INTENSITY_AUGMENTATIONS)}",
    )
    spatial_set = config.data.get("spatial_augmentation", "small")
    need(
        spatial_set in pipeline.SPATIAL_AUGMENTATIONS,
        "data.spatial_augmentation",
        f"{spatial_set!r} is not one of {'|'.join(pipeline.SPATIAL_AUGMENTATIONS)}",
    )
    need(config.data.modality in ("CT", "MR"), "data.modality", f"{config.data.modality!r} is not 'CT' or 'MR'")
    signal_loss = config.data.get("organ_signal_loss", 0.0)
    need(0 <= signal_loss <= 1, "data.organ_signal_loss", f"must be in [0, 1], got {signal_loss}")
    need(
        signal_loss == 0 or config.data.modality == "MR", "data.organ_signal_loss",
        "darkens MR organs; iron overload brightens the liver on CT: use 0 with CT",
    )
    for field, allowed in (("se", SE_KINDS), ("se_aggregation", AGGREGATIONS), ("upsample", UPSAMPLINGS)):
        value = config.model[field]
        need(value in allowed, f"model.{field}", f"{value!r} is not {'|'.join(allowed)}")
    for position in config.model.se_positions:
        need(position in SE_POSITIONS, "model.se_positions", f"{position!r} is not {'|'.join(SE_POSITIONS)}")
    need(
        config.model.compute_dtype in ("float32", "bfloat16"),
        "model.compute_dtype",
        f"{config.model.compute_dtype!r} is not float32|bfloat16",
    )
    need(0 <= config.data.fold < max(config.data.num_folds, 1), "data.fold", "must be in [0, num_folds)")
    need(config.checkpoint.every_epochs > 0, "checkpoint.every_epochs", "must be > 0")
    need(config.eval.every_epochs > 0, "eval.every_epochs", f"must be > 0, got {config.eval.every_epochs}")
    need(config.checkpoint.keep_latest > 0, "checkpoint.keep_latest", "must be > 0")
    need(
        config.eval.checkpoint in checkpoint.CHOICES,
        "eval.checkpoint",
        f"{config.eval.checkpoint!r} is not {'|'.join(checkpoint.CHOICES)}",
    )
    need(
        config.eval.checkpoint != "best" or config.data.num_val_patients > 0,
        "eval.checkpoint",
        '"best" needs validation patients to choose it; with data.num_val_patients=0 use "latest"',
    )
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
        return _train_and_evaluate(config, Path(workdir).expanduser(), held)


@dataclasses.dataclass
class _Run:
    """What one run sets up before its first step, and what its loop reads."""

    config: ml_collections.ConfigDict
    workdir: Path
    mesh: jax.sharding.Mesh
    class_names: tuple[str, ...]
    steps_per_epoch: int
    train_slices: int
    ckpts: checkpoint.Checkpoints
    log: RunLog
    streamed: StreamedRunData
    train_fn: Any
    predictor: Predictor
    class_weights: jax.Array
    schedule: optax.Schedule

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.train.num_epochs

    def meta(self, step: int, val_dice: float | None, running: RunningLosses) -> dict[str, Any]:
        """What a checkpoint records beside the state."""
        return {
            "step": step,
            "epoch": step // self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "train_slices": self.train_slices,
            "val_dice": val_dice,
            "partial_epoch": running.as_meta(),
            "class_names": list(self.class_names),
            "config": json.loads(self.config.to_json_best_effort()),
        }


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path, held: contextlib.ExitStack) -> dict[str, Any]:
    run, state, running = _set_up(config, workdir, held)
    step = int(jax.device_get(state.step))
    run.log.roll_back_to(step // run.steps_per_epoch)
    validation = _Validation(run)
    stop = _StopRequests()
    with stop.installed():
        for epoch in range(step // run.steps_per_epoch, config.train.num_epochs):
            # ---- train one epoch (or until a stop is asked for) ----
            state, step, images_per_s = _train_epoch(run, state, step, epoch, running, stop)
            epoch_done = step % run.steps_per_epoch == 0
            finished = step == run.total_steps
            val_dice = None
            if epoch_done:
                run.log.record("train", epoch + 1, step, _train_record(run, step, running, images_per_s))
                running = RunningLosses()
            # ---- validate if due ----
            if epoch_done and run.streamed.result().val and is_due(epoch + 1, config.eval.every_epochs, last=finished):
                val_dice = validation.record(state, step, epoch + 1)
            # ---- checkpoint if due, or asked to stop ----
            # A stop in the epoch's last step lets the epoch end normally (records, validation,
            # checkpoint), so that its records are never half written.
            stopping = stop.signal_name is not None and not finished
            if stopping or (epoch_done and is_due(epoch + 1, config.checkpoint.every_epochs, last=finished)):
                run.ckpts.save(step, state, run.meta(step, val_dice, running))
            if stopping:
                raise _stopped(stop.signal_name, step, run)
    run.ckpts.close()
    summary, predictions = validation.final(state, step)
    _write_run_summary(run, summary, predictions)
    return summary or {}


def _set_up(config, workdir: Path, held: contextlib.ExitStack) -> tuple[_Run, TrainState, RunningLosses]:
    """Checks the config and the workdir, builds and compiles the model, starts reading the
    data, and restores the latest checkpoint if there is one."""
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
            *filter(None, [cpu_layout.startup_note(), hugepages.startup_note()]),
            sep="; ",
            flush=True,
        )

    plan = plan_run_data(config)
    class_names = tuple(plan.class_names)
    train_slices = plan.num_train_slices()
    steps_per_epoch = pipeline.steps_per_epoch(
        train_slices, config.train.batch_size, config.train.get("steps_per_epoch", 0)
    )

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
        _check_same_epochs(
            meta, workdir,
            steps_per_epoch=steps_per_epoch, train_slices=train_slices, batch_size=config.train.batch_size,
        )

    tx = make_optimizer(config.train, steps_per_epoch)
    # Decoding the images (slow on a cold cache) overlaps initialising and compiling the model,
    # and, with data.stream_first_epoch, the first epoch's training steps.
    streamed = StreamedRunData(plan, config)
    state, abstract_state = create_train_state(
        build_model(config.model, len(class_names)), tx, image_size=config.data.image_size, seed=config.train.seed,
        mesh=mesh, channels=pipeline.input_channels(config.data),
    )
    model, train_fn = compile_train_step(config, len(class_names), tx, abstract_state, mesh)
    running = RunningLosses()
    if latest is not None:
        state, meta = ckpts.restore(latest, abstract_state)
        running = RunningLosses.from_meta(meta.get("partial_epoch"))
        print(f"Resuming from step {latest} (epoch {latest // steps_per_epoch}) in {ckpts.directory}", flush=True)
    log = RunLog(workdir, enabled=is_chief)  # only now: a refused checkpoint leaves the workdir untouched
    if is_chief:
        _save_config(config, workdir)
    run = _Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        class_names=class_names,
        steps_per_epoch=steps_per_epoch,
        train_slices=train_slices,
        ckpts=ckpts,
        log=log,
        streamed=streamed,
        train_fn=train_fn,
        predictor=Predictor(
            model, mesh, batch_size=config.eval.batch_size, image_size=config.data.image_size,
            context_slices=config.data.context_slices,
        ),
        class_weights=jax.device_put(
            jnp.asarray(streamed.class_weights(), jnp.float32), sharding.replicated_sharding(mesh)
        ),
        schedule=learning_rate_schedule(config.train, steps_per_epoch),
    )
    return run, state, running


def _check_same_epochs(meta: dict[str, Any], workdir: Path, **now: int) -> None:
    """Refuses to resume a run whose epochs would change: their steps, the training slices they
    draw from or the batch size (with fixed-length epochs the steps alone do not show a change of
    data). A checkpoint from before "train_slices" was recorded is checked on the other two."""
    saved = {
        "steps_per_epoch": meta.get("steps_per_epoch"),
        "train_slices": meta.get("train_slices", now["train_slices"]),
        "batch_size": meta.get("config", {}).get("train", {}).get("batch_size", now["batch_size"]),
    }
    changed = [f"{name} {saved[name]} -> {now[name]}" for name in now if saved[name] != now[name]]
    if changed:
        raise ConfigError(
            f"the run in {workdir} cannot resume with other epochs ({'; '.join(changed)}): the data, the batch "
            "size or train.steps_per_epoch changed; use another --workdir"
        )


def _train_epoch(
    run: _Run, state: TrainState, step: int, epoch: int, running: RunningLosses, stop: "_StopRequests"
) -> tuple[TrainState, int, float]:
    """Trains from ``step`` to the end of ``epoch``, or until a stop is asked for; reports
    progress every train.log_every_steps; adds the steps' losses to ``running``. Returns the
    state, the step reached and the images per second of the steps run here (after a resume
    ``running`` also holds steps from before the stop, which this process did not time)."""
    config = run.config
    host_batches = pipeline.iterate_batches(
        run.streamed.train,
        batch_size=config.train.batch_size,
        epoch=epoch,
        seed=config.train.seed,
        augment=(
            functools.partial(
                pipeline.augment_batch,
                modality=config.data.modality,
                intensity_set=config.data.get("intensity_augmentation", "jitter"),
                organ_signal_loss=config.data.get("organ_signal_loss", 0.0),
                spatial_set=config.data.get("spatial_augmentation", "small"),
            )
            if config.data.augment
            else None
        ),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        first_step=step - epoch * run.steps_per_epoch,
        order=run.streamed.first_epoch_order() if epoch == 0 else None,
        num_steps=run.steps_per_epoch,
    )
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    start_step = step
    epoch_start = time.perf_counter()
    window_start, window_images = time.perf_counter(), 0
    for batch in sharding.device_batches(host_batches, run.mesh):
        state, parts = run.train_fn(state, batch, run.class_weights)
        step += 1
        pending.append((step, parts))
        window_images += config.train.batch_size
        if is_due(step, config.train.log_every_steps, last=step % run.steps_per_epoch == 0):
            running.absorb(pending)
            rate = window_images / max(time.perf_counter() - window_start, 1e-9)
            mean_loss = running.means()["loss"]
            lr = float(run.schedule(step - 1))
            print(
                progress_line(step, run.total_steps, run.steps_per_epoch, mean_loss, rate, config.train.batch_size, lr),
                flush=True,
            )
            run.log.scalars(
                step, {"train/loss_running": mean_loss, "train/images_per_s": rate, "train/learning_rate": lr}
            )
            window_start, window_images = time.perf_counter(), 0
        if stop.signal_name:
            break
    running.absorb(pending)
    images_per_s = (step - start_step) * config.train.batch_size / max(time.perf_counter() - epoch_start, 1e-9)
    return state, step, images_per_s


def _train_record(run: _Run, step: int, running: RunningLosses, images_per_s: float) -> dict[str, float]:
    means = running.means()
    return {
        "loss": means["loss"],
        "learning_rate": float(run.schedule(step - 1)),
        "images_per_s": images_per_s,
        "cross_entropy": means["cross_entropy"],
        "dice_loss": means["dice_loss"],
    }


class _Validation:
    """Validation of one run's state, computed at most once per step."""

    def __init__(self, run: _Run):
        self.run = run
        self._step: int | None = None
        self._result = None

    def at(self, state: TrainState, step: int):
        """(loss parts, rows, native predictions by case key) of the state at ``step`` (`validate`),
        or None without validation patients."""
        cases = self.run.streamed.result().val
        if not cases:
            return None
        if self._step != step:
            config = self.run.config
            self._result = validate(
                self.run.predictor, state.variables(), cases, self.run.class_weights,
                loss_weights=loss_settings(config.train), class_names=self.run.class_names,
                largest_component=config.eval.largest_component,
            )
            self._step = step
        return self._result

    def record(self, state: TrainState, step: int, epoch: int) -> float:
        """Validates, writes the epoch's record and a line; returns the mean Dice."""
        val_losses, rows, _ = self.at(state, step)
        summary = evaluate.summarise_rows(rows, self.run.class_names)
        self.run.log.record("val", epoch, step, {**val_losses, **summary})
        print(
            f"epoch {epoch} validation: dice {summary['dice_mean']:.3f} "
            + " ".join(f"{k} {v:.3f}" for k, v in summary["dice"].items())
            + "; predicted/true volume "
            + " ".join(f"{k} {v:.2f}" for k, v in summary["volume_ratio"].items()),
            flush=True,
        )
        return summary["dice_mean"]

    def final(self, state: TrainState, step: int) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
        """The summary and predictions of the final state: the last epoch's validation, or, for a
        finished run started again, a new one."""
        result = self.at(state, step)
        if result is None:
            return None, {}
        _, rows, predictions = result
        return evaluate.summarise_rows(rows, self.run.class_names), predictions


def _write_run_summary(run: _Run, summary: dict[str, Any] | None, predictions: dict[str, np.ndarray]) -> None:
    """Loss curves, validation overlays and the final Dice table."""
    if jax.process_index() == 0:
        from scse_jax import plots

        plots.plot_loss_curves(run.log.read_records(), run.workdir / "loss_curves.png")
        shown = run.streamed.result().val[: run.config.eval.num_overlays]
        if shown:
            plots.save_validation_overlays(shown, predictions, run.workdir / "overlays")
    run.log.close()
    if summary:
        print("Validation (native resolution, mean over validation patients):")
        print(evaluate.dice_table(summary), end="", flush=True)
    elif jax.process_index() == 0 and run.streamed.result().test:
        print(
            "No validation patients (data.num_val_patients=0). Score the held-out patients with\n"
            f"  python -m scse_jax.evaluate --checkpoint {shlex.quote(str(run.workdir))} --split test",
            flush=True,
        )


def _stopped(signal_name: str, step: int, run: _Run) -> RunStopped:
    """Closes the run after a SIGTERM/SIGINT whose checkpoint is saved; the error says how to resume."""
    run.log.close()
    run.ckpts.close()
    return RunStopped(
        f"{signal_name} received: saved step {step} in {run.ckpts.directory}. Resume with the same "
        f"command and --workdir={run.workdir}"
    )
