"""Shared test set-up: a fast JAX on the CPU, paths to the real shared data."""

import os
from pathlib import Path

import pytest

# Eight fake CPU devices for the sharding tests; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
# Tests build the same tiny programs many times; a persistent cache compiles each once.
jax.config.update("jax_compilation_cache_dir", str(Path(__file__).resolve().parents[1] / ".cache" / "jax_tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CT_SAMPLE = Path(os.environ.get("SCSE_CHAOS_CT_SAMPLE", PROJECT_ROOT / "../shared/data/chaos_ct_sample"))
MR_T2 = Path(os.environ.get("SCSE_CHAOS_MR_T2", PROJECT_ROOT / "../shared/data/chaos_mr_t2"))


@pytest.fixture(scope="session")
def ct_sample_dir() -> Path:
    """The real CHAOS CT sample (DICOM_anon/, Ground/, Segmentation/), or a skip."""
    if not (CT_SAMPLE / "DICOM_anon").is_dir():
        pytest.skip(f"real CHAOS CT sample not found at {CT_SAMPLE} (set SCSE_CHAOS_CT_SAMPLE)")
    return CT_SAMPLE


@pytest.fixture(scope="session")
def mr_t2_dir() -> Path:
    """The real CHAOST2 NIfTI folder, or a skip."""
    if not any(MR_T2.glob("image_*.nii.gz")):
        pytest.skip(f"real CHAOS MR T2 NIfTI folder not found at {MR_T2} (set SCSE_CHAOS_MR_T2)")
    return MR_T2


def tiny_config(data_root, cache_dir, *overrides):
    """A run small enough to train in seconds: 32 px, width 4, batches of 8 (one per fake device),
    then `overrides` (``--config.field=value``)."""
    from configs import default
    from scse_jax.config_files import apply_overrides

    config = default.get_config()
    config.data.root = str(data_root)
    config.data.cache_dir = str(cache_dir)
    config.data.image_size = 32
    config.data.num_folds = 4
    config.data.num_val_patients = 1
    config.model.features = 4
    config.train.batch_size = 8
    config.train.num_epochs = 1
    config.train.log_every_steps = 1
    config.eval.batch_size = 8
    config.eval.num_overlays = 1
    apply_overrides(config, overrides)
    return config


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(synthetic MR CHAOS tree of 5 patients, 32 x 32 x 8, and a cache folder)."""
    from scse_jax.data import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.write_synthetic_chaos(root / "chaos", patients=5, size=32, slices=8, seed=0, modalities=("MR",))
    return root / "chaos", root / "cache"


@pytest.fixture(scope="session")
def tiny_trained_run(tiny_data, tmp_path_factory):
    """A finished one-epoch run on tiny_data: (workdir, its stdout, its validation summary).

    Shared read-only; a test that trains more copies it first.
    """
    import contextlib
    import io

    from scse_jax import train

    workdir = tmp_path_factory.mktemp("one_epoch") / "run"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        summary = train.train_and_evaluate(tiny_config(*tiny_data), workdir)
    return workdir, buffer.getvalue(), summary


@pytest.fixture(scope="session")
def two_checkpoint_run(tiny_trained_run, tmp_path_factory):
    """tiny_trained_run plus a later checkpoint with other parameters and a lower validation
    Dice, whose config says eval.checkpoint = "latest": (workdir, best step, latest step)."""
    import shutil

    import jax
    import ml_collections

    from scse_jax import checkpoint
    from scse_jax.inference import _restore_state

    workdir = tmp_path_factory.mktemp("two_checkpoints") / "run"
    shutil.copytree(tiny_trained_run[0], workdir)
    ckpts = checkpoint.Checkpoints(checkpoint.checkpoint_dir(workdir))
    try:
        best = ckpts.latest_step()
        meta = ckpts.restore_meta(best)
        config = ml_collections.ConfigDict(meta["config"])
        state = _restore_state(ckpts, best, meta, config, len(meta["class_names"]))
        leaves, tree = jax.tree.flatten(state.params)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        params = jax.tree.unflatten(tree, [
            leaf + 0.5 * leaf.std() * jax.random.normal(key, leaf.shape, leaf.dtype) for leaf, key in zip(leaves, keys)
        ])  # fmt: skip
        config.eval.checkpoint = "latest"
        later = {**meta, "step": best + 1, "val_dice": meta["val_dice"] - 0.5, "config": config.to_dict()}
        ckpts.save(best + 1, state.replace(params=params), later)
    finally:
        ckpts.close()
    return workdir, best, best + 1
