"""The training loop end to end on tiny synthetic data: files, resume, schedule, sharding."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from scse_jax import compilation, sharding, train
from scse_jax.state import build_model, create_train_state, learning_rate_schedule, make_optimizer
from scse_jax.data import pipeline
from scse_jax.errors import CheckpointError, ConfigError
from scse_jax.models.cpu_ops import CpuConv3x3
from tests.conftest import tiny_config


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_params(workdir):
    from scse_jax.inference import Segmenter

    return Segmenter.from_checkpoint(workdir, which="latest").variables


def test_one_epoch_leaves_every_artefact(tiny_trained_run):
    run, out, summary = tiny_trained_run
    records = read_metrics(run)
    assert [(r["split"], r["epoch"]) for r in records] == [("train", 1), ("val", 1)]
    assert np.isfinite(records[0]["loss"]) and records[0]["step"] > 0
    assert set(records[1]["dice"]) == {"liver", "right_kidney", "left_kidney", "spleen"}
    assert (run / "config.json").is_file()
    assert json.loads((run / "config.json").read_text())["model"]["features"] == 4
    assert any((run / "tensorboard").iterdir())
    assert (run / "loss_curves.png").stat().st_size > 1000
    assert list((run / "overlays").glob("*.png"))
    assert (run / "checkpoints" / str(records[0]["step"])).is_dir()
    assert "liver" in out and "dice" in out and "img/s" in out
    assert 0.0 <= summary["dice_mean"] <= 1.0


def test_resume_continues_and_matches_an_uninterrupted_run(tiny_trained_run, tiny_data, tmp_path, capsys):
    straight = tmp_path / "straight"
    train.train_and_evaluate(tiny_config(*tiny_data, "--config.train.num_epochs=2"), straight)
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_trained_run[0], resumed)
    capsys.readouterr()
    train.train_and_evaluate(tiny_config(*tiny_data, "--config.train.num_epochs=2"), resumed)
    assert "Resuming from step" in capsys.readouterr().out
    epochs = [(r["split"], r["epoch"]) for r in read_metrics(resumed)]
    assert epochs == [("train", 1), ("val", 1), ("train", 2), ("val", 2)]
    # Same seed, same machine: the same losses and parameters, bit for bit.
    assert [r.get("loss") for r in read_metrics(straight)] == [r.get("loss") for r in read_metrics(resumed)]
    a = final_params(straight)
    b = final_params(resumed)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_resume_refuses_another_model(tiny_trained_run, tiny_data, tmp_path):
    shutil.copytree(tiny_trained_run[0], tmp_path / "run")
    with pytest.raises(CheckpointError, match="model.features: checkpoint 4 vs config 8"):
        train.train_and_evaluate(tiny_config(*tiny_data, "--config.model.features=8"), tmp_path / "run")
    with pytest.raises(CheckpointError, match="data.image_size: checkpoint 32 vs config 48"):
        train.train_and_evaluate(tiny_config(*tiny_data, "--config.data.image_size=48"), tmp_path / "run")
    with pytest.raises(CheckpointError, match="model.deep_supervision: checkpoint False vs config True"):
        train.train_and_evaluate(tiny_config(*tiny_data, "--config.model.deep_supervision=True"), tmp_path / "run")


def test_fixed_length_epochs_set_the_run_length_and_the_schedule(tiny_trained_run, tiny_data, tmp_path):
    one_pass = [r for r in read_metrics(tiny_trained_run[0]) if r["split"] == "train"][0]["step"]
    fixed = one_pass + 2  # longer than one pass: rows repeat within the epoch
    workdir = tmp_path / "run"
    train.train_and_evaluate(
        tiny_config(*tiny_data, "--config.train.num_epochs=2", f"--config.train.steps_per_epoch={fixed}",
                    "--config.train.decay_epochs=1", "--config.eval.every_epochs=2"),
        workdir,
    )
    records = [r for r in read_metrics(workdir) if r["split"] == "train"]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, fixed), (2, 2 * fixed)]
    assert records[1]["learning_rate"] == pytest.approx(records[0]["learning_rate"] / 2)  # halved after `fixed` steps
    with pytest.raises(ConfigError, match=f"steps_per_epoch {fixed} -> {one_pass}"):  # only with the same length
        train.train_and_evaluate(tiny_config(*tiny_data, "--config.train.num_epochs=3"), workdir)
    with pytest.raises(ConfigError, match="batch_size 8 -> 16"):  # the same length, but other batches
        train.train_and_evaluate(
            tiny_config(*tiny_data, "--config.train.num_epochs=3", f"--config.train.steps_per_epoch={fixed}",
                        "--config.train.batch_size=16", "--config.eval.batch_size=16"),
            workdir,
        )


def test_resuming_with_other_training_slices_is_refused_even_where_the_epoch_length_is_fixed(tmp_path):
    meta = {"steps_per_epoch": 25, "train_slices": 420, "config": {"train": {"batch_size": 10}}}
    train._check_same_epochs(meta, tmp_path, steps_per_epoch=25, train_slices=420, batch_size=10)
    with pytest.raises(ConfigError, match="train_slices 420 -> 533"):  # patients added to the data folder
        train._check_same_epochs(meta, tmp_path, steps_per_epoch=25, train_slices=533, batch_size=10)
    older = {"steps_per_epoch": 42, "config": {"train": {"batch_size": 10}}}  # saved before train_slices was
    train._check_same_epochs(older, tmp_path, steps_per_epoch=42, train_slices=420, batch_size=10)


def test_a_run_with_parameter_averaging_serves_the_average(tiny_data, tmp_path):
    import ml_collections

    from scse_jax import checkpoint, inference
    from scse_jax.state import params_average

    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(*tiny_data, "--config.train.ema_decay=0.9"), workdir)
    served = inference.Segmenter.from_checkpoint(workdir, which="latest").variables["params"]
    ckpts = checkpoint.Checkpoints(workdir / "checkpoints", read_only=True)
    step = ckpts.latest_step()
    meta = ckpts.restore_meta(step)
    state = inference._restore_state(ckpts, step, meta, ml_collections.ConfigDict(meta["config"]), 5)
    average = params_average(state.opt_state)
    assert average is not None
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), served, average)
    changed = jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), served, state.params)
    assert any(jax.tree.leaves(changed))


@pytest.mark.parametrize("field, value", [("data__fold", 1), ("data__split_seed", 3), ("data__num_folds", 5)])
def test_resume_refuses_another_patient_split(tiny_trained_run, tiny_data, tmp_path, field, value):
    shutil.copytree(tiny_trained_run[0], tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    name = field.replace("__", ".")
    with pytest.raises(CheckpointError, match=f"{name}: checkpoint .* vs config {value}"):
        train.train_and_evaluate(tiny_config(*tiny_data, f"--config.{name}={value}"), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_resume_accepts_the_same_data_root_spelt_another_way(tiny_trained_run, tiny_data, tmp_path, monkeypatch):
    shutil.copytree(tiny_trained_run[0], tmp_path / "run")
    root, cache = tiny_data
    monkeypatch.chdir(root.parent)
    config = tiny_config(f"./{root.name}/../{root.name}", cache)  # relative, not the saved absolute path
    summary = train.train_and_evaluate(config, tmp_path / "run")  # resumes the finished run: nothing to train
    assert summary["dice_mean"] == pytest.approx(tiny_trained_run[2]["dice_mean"])


def test_schedule_halves_every_four_epochs():
    config = default.get_config()
    schedule = learning_rate_schedule(config.train, steps_per_epoch=3)
    assert float(schedule(0)) == pytest.approx(0.004)
    assert float(schedule(11)) == pytest.approx(0.004)  # last step of epoch 4
    assert float(schedule(12)) == pytest.approx(0.002)  # first step of epoch 5
    assert float(schedule(23)) == pytest.approx(0.002)
    assert float(schedule(24)) == pytest.approx(0.001)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("data.image_size", 40, "multiple of 16"),
        ("train.batch_size", 12, "device count"),
        ("train.num_epochs", 0, "> 0"),
        ("train.log_every_steps", 0, "train.log_every_steps: must be > 0"),
        ("train.decay_rate", 0.0, "train.decay_rate: must be > 0"),
        ("train.decay_rate", -0.5, "train.decay_rate: must be > 0"),
        ("train.ema_decay", 1.0, r"train.ema_decay: must be in \[0, 1\)"),
        ("train.ema_decay", -0.1, r"train.ema_decay: must be in \[0, 1\)"),
        ("train.steps_per_epoch", -1, "train.steps_per_epoch: must be >= 0"),
        ("eval.every_epochs", 0, "eval.every_epochs: must be > 0"),
        ("model.se", "csse", "none|cse|sse|scse"),
        ("data.intensity_augmentation", "strong", "jitter|nnunet|gin"),
        ("data.spatial_augmentation", "huge", "data.spatial_augmentation: 'huge' is not one of small|wide"),
        ("data.organ_signal_loss", 1.5, r"data.organ_signal_loss: must be in \[0, 1\]"),
        ("data.root", "/no/such/folder", "does not exist"),
        ("data.num_val_patients", 0, 'eval.checkpoint: "best" needs validation patients'),
    ],
)
def test_bad_config_values_are_refused_before_work(field, value, message):
    config = default.get_config()
    config.train.batch_size = config.eval.batch_size = 8
    group, name = field.split(".")
    config[group][name] = value
    with pytest.raises(ConfigError, match=message):
        train.validate_config(config, device_count=8)


def test_organ_signal_loss_is_refused_on_ct():
    config = default.get_config()
    config.train.batch_size = config.eval.batch_size = 8
    config.data.modality, config.data.sequences = "CT", ("CT",)
    train.validate_config(config, device_count=8)
    config.data.organ_signal_loss = 0.2
    with pytest.raises(ConfigError, match="data.organ_signal_loss: darkens MR organs"):
        train.validate_config(config, device_count=8)


def test_sharded_step_equals_single_device_step():
    """One step over 8 devices moves every parameter as one device does (global BatchNorm)."""
    assert jax.device_count() == 8
    model = build_model(_small_model_config(), 3)
    tx = optax.sgd(0.1)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 32, 32, 1)).astype(np.float32),
        "label": rng.integers(0, 3, size=(8, 32, 32)).astype(np.int32),
    }
    weights = jnp.array([0.2, 1.0, 1.8])
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_data_mesh(devices)
        state, _ = create_train_state(model, tx, image_size=32, seed=0, mesh=mesh)
        before = jax.device_get(state.variables())
        step = train.jit_train_step(model, tx, default.get_config().train, mesh)
        state, parts = step(state, sharding.shard_batch(batch, mesh), jax.device_put(weights, sharding.replicated_sharding(mesh)))
        results.append((float(parts["loss"]), before, jax.device_get(state.variables())))
    (loss1, before, after1), (loss8, _, after8) = results
    assert loss8 == pytest.approx(loss1, rel=1e-5)

    # The updates agree to within 10% of their size (measured: < 0.1% with XLA's optimisations,
    # up to 4% in the tests' unoptimised build, whose BatchNorm moments lose more to cancellation).
    # BatchNorm statistics per device, over one example each, would change them by O(1).
    def relative_gap(start, one, eight):
        return np.linalg.norm(eight - one) / max(np.linalg.norm(one - start), 1e-12)

    gaps = jax.tree.leaves(jax.tree.map(relative_gap, before, after1, after8))
    assert max(gaps) < 0.1


def _small_model_config():
    config = default.get_config().model
    config.features = 4
    return config


def test_steps_compile_at_llvm_o1_on_the_cpu_unless_optimisations_are_off():
    assert compilation.step_compiler_options() is None  # conftest turns most optimisations off
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        options = compilation.step_compiler_options()
        assert options == {"xla_backend_optimization_level": 1}
        doubled = jax.jit(lambda x: 2 * x, compiler_options=options)(jnp.arange(3.0))
    finally:
        jax.config.update("jax_disable_most_optimizations", True)
    np.testing.assert_array_equal(doubled, [0.0, 2.0, 4.0])


@pytest.mark.parametrize("overrides", [(), ("--config.data.soft_labels=True",)])
def test_train_step_compiled_ahead_serves_the_first_real_batch(tiny_data, overrides):
    from scse_jax.data.run_data import load_run_data, plan_run_data

    config = tiny_config(*tiny_data, *overrides)
    mesh = sharding.make_data_mesh()
    plan = plan_run_data(config)
    data = load_run_data(config)
    assert plan.num_train_slices() == len(data.train)
    model = build_model(config.model, len(plan.class_names))
    tx = make_optimizer(config.train, steps_per_epoch=2)
    state, abstract_state = create_train_state(model, tx, image_size=32, seed=0, mesh=mesh)
    host_batches = pipeline.iterate_batches(
        data.train, batch_size=8, epoch=0, seed=0,
        augment=functools.partial(pipeline.augment_batch, modality="MR"),
    )
    batch = next(iter(sharding.device_batches(host_batches, mesh)))
    weights = jax.device_put(jnp.asarray(data.class_weights, jnp.float32), sharding.replicated_sharding(mesh))

    compiled = []

    def record(name, seconds, fun_name="", **_):
        if name.endswith("backend_compile_duration"):
            compiled.append(fun_name)

    train_fn = train.jit_train_step(model, tx, config.train, mesh)
    jax.monitoring.register_event_duration_secs_listener(record)  # a disk cache hit records it too
    try:
        train.compile_train_step_ahead(train_fn, abstract_state, config, mesh, len(plan.class_names))
        ahead = list(compiled)
        compiled.clear()
        state, parts = train_fn(state, batch, weights)
        first_call = list(compiled)
    finally:
        jax.monitoring.unregister_event_duration_listener(record)
    assert np.isfinite(float(parts["loss"]))
    # a cache miss would compile the step again; counted, not timed, so load cannot fail it
    assert ahead and not set(ahead) & set(first_call), (ahead, first_call)


def test_a_run_with_soft_labels_trains_on_the_label_shares(tiny_data, tmp_path, monkeypatch):
    from scse_jax import losses
    from scse_jax.data.run_data import load_run_data

    config = tiny_config(*tiny_data, "--config.data.soft_labels=True", "--config.data.image_size=16")
    shares = load_run_data(config).train.label_shares
    assert shares.shape[1:] == (16, 16, 5) and np.any((shares > 0) & (shares < 1))  # halved: outlines share pixels
    train_step_targets = []
    segmentation_loss = losses.segmentation_loss

    def recording(logits, labels, class_weights, *, shares=None, **weights):
        if weights.get("example_mask") is None:  # validation passes a mask, the train step none
            train_step_targets.append(None if shares is None else shares.shape)
        return segmentation_loss(logits, labels, class_weights, shares=shares, **weights)

    monkeypatch.setattr(losses, "segmentation_loss", recording)
    train.train_and_evaluate(config, tmp_path / "run")
    # Traced ahead of the data and again for any batch of another structure: every trace had shares.
    assert train_step_targets and set(train_step_targets) == {(8, 16, 16, 5)}
    assert all(np.isfinite(row["loss"]) for row in read_metrics(tmp_path / "run"))


def test_a_run_with_deep_supervision_scores_its_coarse_outputs_and_serves_the_full_size_one(tiny_data, tmp_path, monkeypatch):
    from scse_jax import losses
    from scse_jax.inference import Segmenter

    config = tiny_config(*tiny_data, "--config.model.deep_supervision=True")
    traced_sides = []
    deep_supervision_loss = losses.deep_supervision_loss

    def recording(logits_by_scale, labels, class_weights, **kwargs):
        traced_sides.append(tuple(logits.shape[1] for logits in logits_by_scale))
        return deep_supervision_loss(logits_by_scale, labels, class_weights, **kwargs)

    monkeypatch.setattr(losses, "deep_supervision_loss", recording)
    train.train_and_evaluate(config, tmp_path / "run")
    assert traced_sides and set(traced_sides) == {(32, 16, 8)}
    assert all(np.isfinite(row["loss"]) for row in read_metrics(tmp_path / "run"))

    segmenter = Segmenter.from_checkpoint(tmp_path / "run", which="latest")
    assert {"dec2_head", "dec3_head"} <= set(segmenter.variables["params"])
    images = np.zeros((3, 32, 32), np.float32)
    assert segmenter.segment(images, probabilities=True).shape == (3, 32, 32, 5)


WAIT_S = 600  # a guard against a hang only: an event ends the wait below, however slow the first step


def test_training_starts_before_the_last_training_case_is_read(tmp_path, monkeypatch):
    import threading

    from scse_jax.data import chaos, synthetic

    root = synthetic.write_synthetic_chaos(tmp_path / "chaos", patients=8, size=32, slices=8, seed=1, modalities=("MR",))
    config = tiny_config(root, tmp_path / "cache")  # 5 training patients: 5 steps of 8 slices
    first_step_done = threading.Event()
    decided = threading.Event()  # the first step is done, or training waits for the held-back case
    last_case_waited = []
    jit_train_step, load_case = train.jit_train_step, chaos.load_case

    class SignallingStep:
        def __init__(self, *args):
            self.compiled = jit_train_step(*args)
            self.lower = self.compiled.lower

        def __call__(self, *args):
            outputs = self.compiled(*args)
            jax.block_until_ready(outputs)
            first_step_done.set()
            decided.set()
            return outputs

    def last_case_waits_for_the_first_step(case, **kwargs):
        assert cases_known.wait(timeout=60)
        if case.key == streamed_cases[-1].key:
            decided.wait(timeout=WAIT_S)
            last_case_waited.append(first_step_done.is_set())
        return load_case(case, **kwargs)

    from scse_jax.data.pipeline import StreamedSliceDataset
    from scse_jax.data.run_data import StreamedRunData

    # Training that waits for the held-back case releases it at once (and fails), not after WAIT_S.
    wait_for_rows, result, rows_asked = StreamedSliceDataset.wait_for_rows, StreamedRunData.result, []

    def first_batch_may_need_the_last_case(self, stop):
        if not rows_asked and stop > len(self) - chaos.num_slices(streamed_cases[-1]):
            decided.set()
        rows_asked.append(stop)
        wait_for_rows(self, stop)

    def every_case_may_be_awaited(self):
        decided.set()
        return result(self)

    streamed_cases, cases_known = [], threading.Event()
    original_init = StreamedRunData.__init__

    def recording_init(self, plan, config):
        original_init(self, plan, config)
        streamed_cases.extend(self.train_cases)
        cases_known.set()

    monkeypatch.setattr(StreamedRunData, "__init__", recording_init)
    monkeypatch.setattr(StreamedSliceDataset, "wait_for_rows", first_batch_may_need_the_last_case)
    monkeypatch.setattr(StreamedRunData, "result", every_case_may_be_awaited)
    monkeypatch.setattr(train, "jit_train_step", SignallingStep)
    monkeypatch.setattr(chaos, "load_case", last_case_waits_for_the_first_step)
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert last_case_waited == [True] and np.isfinite(summary["dice_mean"])


def test_a_train_step_too_big_for_memory_falls_back_to_xlas_kernel_gradient(tiny_data, tmp_path, monkeypatch, capsys):
    compiled_models = []
    jit_train_step = train.jit_train_step

    def recording(model, *args):
        compiled_models.append(model.conv is CpuConv3x3)
        return jit_train_step(model, *args)

    monkeypatch.setattr(train, "jit_train_step", recording)
    monkeypatch.setattr(compilation, "STEP_MEMORY_SHARE", 1e-9)  # nothing fits: the fallback must still train
    summary = train.train_and_evaluate(tiny_config(*tiny_data), tmp_path / "run")
    out = capsys.readouterr().out
    assert compiled_models == [True, False]
    assert "using XLA's kernel gradient (model.fast_kernel_gradient=False)" in out
    assert np.isfinite(summary["dice_mean"])


def test_step_memory_check_against_the_device_budget():
    class Compiled:
        def __init__(self, temp_bytes):
            self.temp_bytes = temp_bytes

        def memory_analysis(self):
            return type("Analysis", (), {"temp_size_in_bytes": self.temp_bytes})()

    device = jax.devices()[0]
    budget = compilation.memory_budget_bytes(device)
    assert budget and budget > 2**26  # the host's memory, shared by the test's 8 CPU devices
    assert compilation.step_fits_in_memory(Compiled(2**20), device)[0]
    fits, gib = compilation.step_fits_in_memory(Compiled(budget), device)
    assert not fits and gib == pytest.approx(budget / 2**30)


def test_periodic_actions_are_due_every_n_and_at_the_last():
    assert [count for count in range(1, 8) if train.is_due(count, 3)] == [3, 6]
    assert train.is_due(7, 3, last=True) and not train.is_due(7, 3)


def test_running_losses_survive_a_checkpoint_and_read_older_ones():
    from scse_jax.errors import TrainingError

    running = train.RunningLosses()
    pending = [(1, {"loss": 1.0, "cross_entropy": 0.25, "dice_loss": 0.75}),
               (2, {"loss": jnp.float32(3.0), "cross_entropy": jnp.float32(1.0), "dice_loss": jnp.float32(2.0)})]
    running.absorb(pending)
    assert pending == [] and running.means() == {"loss": 2.0, "cross_entropy": 0.625, "dice_loss": 1.375}
    assert train.RunningLosses.from_meta(json.loads(json.dumps(running.as_meta()))) == running
    older = train.RunningLosses.from_meta({"loss_sum": 3.0, "loss_count": 2})  # an epoch's end, before the parts
    assert older.means() == {"loss": 1.5, "cross_entropy": 0.0, "dice_loss": 0.0}
    assert train.RunningLosses.from_meta(None) == train.RunningLosses()
    with pytest.raises(TrainingError, match="non-finite loss .* at step 7"):
        running.absorb([(7, {"loss": float("nan"), "cross_entropy": 0.0, "dice_loss": 0.0})])
    with pytest.raises(TrainingError, match="non-finite loss .* at step 8"):  # a coarse output's, with deep supervision
        running.absorb([(8, {"loss": 1.0, "cross_entropy": 0.5, "dice_loss": 0.5, "deep_supervision_loss": float("inf")})])


def test_images_per_second_after_a_mid_epoch_resume_counts_only_the_steps_run_since(monkeypatch, capsys):
    """A resumed epoch's running losses hold steps from before the stop; its rate must not."""
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def one_second_step(state, batch, class_weights):
        clock[0] += 1.0
        return state, {"loss": 1.0, "cross_entropy": 0.5, "dice_loss": 0.5}

    config = default.get_config()
    config.data.augment = False
    config.train.batch_size = 8
    config.train.log_every_steps = 1
    rows = 4 * config.train.batch_size  # four steps per epoch
    run = SimpleNamespace(
        config=config,
        streamed=SimpleNamespace(train=pipeline.SliceDataset(np.zeros((rows, 16, 16, 1), np.float32),
                                                             np.zeros((rows, 16, 16), np.int32))),
        mesh=sharding.make_data_mesh(),
        train_fn=one_second_step,
        class_weights=None,
        steps_per_epoch=4,
        total_steps=8,
        schedule=lambda step: 0.004,
        log=SimpleNamespace(scalars=lambda step, values: None),
    )
    running = train.RunningLosses.from_meta({"loss_sum": 1.0, "loss_count": 1})  # stopped after step 5
    stop = SimpleNamespace(signal_name=None)
    state, step, images_per_s = train._train_epoch(run, "state", 5, 1, running, stop)
    assert (step, running.loss_count) == (8, 4)
    assert images_per_s == pytest.approx(8.0)  # 3 steps of 8 images in 3 s, not 4 steps
    assert train._train_record(run, step, running, images_per_s)["images_per_s"] == pytest.approx(8.0)


def test_an_unknown_eval_checkpoint_is_refused():
    config = default.get_config()
    config.train.batch_size = config.eval.batch_size = 8
    config.eval.checkpoint = "middle"
    with pytest.raises(ConfigError, match="eval.checkpoint: 'middle' is not best[|]latest"):
        train.validate_config(config, device_count=8)


def test_allowed_model_values_are_the_models_own():
    from scse_jax.models.se import AGGREGATIONS
    from scse_jax.models.unet import SE_POSITIONS, UPSAMPLINGS

    for field, allowed in (("se_aggregation", AGGREGATIONS), ("upsample", UPSAMPLINGS), ("se_positions", SE_POSITIONS)):
        config = default.get_config()
        config.train.batch_size = config.eval.batch_size = 8
        config.model[field] = ("nowhere",) if field == "se_positions" else "other"
        with pytest.raises(ConfigError, match=f"model.{field}: .* is not {'[|]'.join(allowed)}"):
            train.validate_config(config, device_count=8)


def test_a_run_without_validation_patients_trains_on_them_and_says_how_to_score(tiny_data, tmp_path, capsys):
    from scse_jax import evaluate
    from scse_jax.data.run_data import plan_run_data

    workdir = tmp_path / "run"
    config = tiny_config(*tiny_data, "--config.data.num_val_patients=0", "--config.eval.checkpoint=latest")
    split = plan_run_data(config).split
    assert split.val == () and len(split.train) == 5 - len(split.test)
    assert train.train_and_evaluate(config, workdir) == {}
    out, err = capsys.readouterr()
    assert f"from {len(split.train)} training label maps" in err
    assert f"python -m scse_jax.evaluate --checkpoint {workdir} --split test" in out
    assert [r["split"] for r in read_metrics(workdir)] == ["train"]
    rows, *_ = evaluate.score_checkpoint(workdir, split="test")
    assert {r["organ"] for r in rows} == {"liver", "right_kidney", "left_kidney", "spleen"}
