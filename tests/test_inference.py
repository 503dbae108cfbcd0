"""Segmenter: restore without training data, one compiled function, native-grid results."""

import os
import subprocess
import sys

import numpy as np
import pytest

from scse_jax import cpu_layout
from scse_jax.data import chaos, dicom
from scse_jax.errors import CheckpointError, ConfigError, DataError
from scse_jax.inference import Segmenter
from tests.conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def segmenter(tiny_trained_run):
    return Segmenter.from_checkpoint(tiny_trained_run[0], which="latest")


def test_restores_config_classes_and_step(segmenter, tiny_trained_run):
    assert segmenter.class_names == ("background", "liver", "right_kidney", "left_kidney", "spleen")
    assert segmenter.config.model.features == 4
    assert segmenter.step > 0
    best = Segmenter.from_checkpoint(tiny_trained_run[0] / "checkpoints", which="best")
    assert best.step == segmenter.step  # one epoch: latest is best


def test_missing_or_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        Segmenter.from_checkpoint(tmp_path / "nothing")
    (tmp_path / "other" / "3").mkdir(parents=True)
    (tmp_path / "other" / "3" / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError):
        Segmenter.from_checkpoint(tmp_path / "other")


def test_by_default_a_run_s_own_eval_checkpoint_is_restored(two_checkpoint_run):
    run, best, latest = two_checkpoint_run  # its config says eval.checkpoint = "latest"
    restored = Segmenter.from_checkpoint(run)
    assert restored.step == latest and restored.chosen == f"step {latest}, the run's eval.checkpoint: latest"
    assert Segmenter.from_checkpoint(run, which="best").step == best


def test_best_without_a_validation_score_points_to_latest(tiny_trained_run, monkeypatch):
    from scse_jax import checkpoint

    monkeypatch.setattr(checkpoint.Checkpoints, "best_step", lambda self: None)  # as after runs without validation
    with pytest.raises(CheckpointError, match='no best checkpoint in .*; none has a validation score [(]which="latest" works'):
        Segmenter.from_checkpoint(tiny_trained_run[0], which="best")
    with pytest.raises(CheckpointError, match="no best checkpoint"):  # the run's own eval.checkpoint
        Segmenter.from_checkpoint(tiny_trained_run[0])
    assert Segmenter.from_checkpoint(tiny_trained_run[0], which="latest").step > 0


def _layout_notes_around_a_segmenter(run_dir, requested: str | None) -> tuple[str, str]:
    """(startup_note after cpu_layout.set_up(requested), if any; startup_note after
    Segmenter.from_checkpoint), in a fresh process whose JAX has not started."""
    code = "\n".join([
        "import sys",
        "from scse_jax import cpu_layout",
        "from scse_jax.inference import Segmenter",
        "before = ''",
        "if sys.argv[2] != 'none':",
        "    cpu_layout.set_up(sys.argv[2], [])",
        "    before = cpu_layout.startup_note()  # starts JAX, as a training run's start-up line does",
        "Segmenter.from_checkpoint(sys.argv[1])",
        "print(before)",
        "print(cpu_layout.startup_note())",
    ])
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    completed = subprocess.run(
        [sys.executable, "-c", code, str(run_dir), requested or "none"], env=env, cwd=PROJECT_ROOT,
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    before, after = completed.stdout.splitlines()[-2:]
    return before, after


def test_a_segmenter_keeps_the_cpu_layout_note_of_the_call_that_set_the_layout(tiny_trained_run):
    before, after = _layout_notes_around_a_segmenter(tiny_trained_run[0], "2")
    assert before == after == "CPU layout: 2 JAX devices (asked for)"
    _, after = _layout_notes_around_a_segmenter(tiny_trained_run[0], None)  # the Segmenter sets it
    assert after == cpu_layout.choose_layout(None, [], cores=cpu_layout.physical_cores()).describe()


def test_non_finite_or_empty_input_is_refused_not_read_as_background(segmenter):
    volume = np.random.default_rng(0).normal(size=(3, 40, 40)).astype(np.float32)
    volume[1, 5, 5] = np.nan
    with pytest.raises(DataError, match=r"non-finite values \(NaN or infinity\); training refuses such volumes"):
        segmenter.segment_volume(volume)
    images = np.zeros((2, 32, 32), np.float32)
    images[0, 0, 0] = np.inf
    with pytest.raises(DataError, match="non-finite values"):
        segmenter.segment(images)
    with pytest.raises(ConfigError, match=r"a \(slices, rows, cols\) volume with voxels, got \(0, 40, 40\)"):
        segmenter.segment_volume(np.zeros((0, 40, 40), np.float32))


def test_segment_labels_and_probabilities(segmenter):
    images = np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)
    labels = segmenter.segment(images)
    assert labels.shape == (3, 32, 32) and labels.dtype == np.uint8 and labels.max() < 5
    probs = segmenter.segment(images, probabilities=True)
    assert probs.shape == (3, 32, 32, 5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(-1), labels)
    tta = segmenter.segment(images, probabilities=True, tta=True)
    np.testing.assert_allclose(tta.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(Exception, match="expects"):
        segmenter.segment(np.zeros((2, 48, 48), np.float32))


def test_volumes_of_any_length_reuse_one_compilation(segmenter, tiny_data):
    case = chaos.find_cases(tiny_data[0])[0]
    volume = chaos.load_case(case)
    fresh = Segmenter(segmenter.config, segmenter.variables, segmenter.class_names)
    first = fresh.segment_volume(volume)
    shorter = fresh.segment_volume(volume.voxels[:5])
    longer = fresh.segment_volume(np.concatenate([volume.voxels] * 3))
    assert fresh.traces == 1
    assert first.shape == volume.voxels.shape and shorter.shape == (5,) + volume.voxels.shape[1:]
    assert longer.shape == (3 * len(volume.voxels),) + volume.voxels.shape[1:]
    # The same slices give the same labels (up to float ties from renormalising the longer volume).
    assert np.mean(longer[: len(first)] == first) > 0.999


def test_segment_series_keeps_the_series_order_and_size(segmenter, tiny_data):
    case = chaos.find_cases(tiny_data[0])[0]
    folder = case.image_files[0].parent
    labels = segmenter.segment_series(folder)
    voxels, _ = dicom.read_series(dicom.series_files(folder))
    assert labels.shape == voxels.shape
    np.testing.assert_array_equal(labels, segmenter.segment_volume(voxels))


def test_segment_series_on_the_real_ct_sample(segmenter, ct_sample_dir):
    labels = segmenter.segment_series(ct_sample_dir / "DICOM_anon", modality="CT")
    assert labels.shape == (78, 512, 512) and labels.dtype == np.uint8


def test_segment_volume_probabilities_on_the_native_grid(segmenter, tiny_data):
    volume = chaos.load_case(chaos.find_cases(tiny_data[0])[0])
    probs = segmenter.segment_volume(volume, probabilities=True)
    assert probs.shape == volume.voxels.shape + (5,) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
    assert segmenter.largest_component is False  # else the labels would differ by the removed islands
    np.testing.assert_array_equal(probs.argmax(-1), segmenter.segment_volume(volume))
    tta = segmenter.segment_volume(volume, probabilities=True, tta=True)
    np.testing.assert_array_equal(tta.argmax(-1), segmenter.segment_volume(volume, tta=True))


def test_largest_component_setting_reaches_volume_results(segmenter, tiny_data, monkeypatch):
    from scse_jax import postprocess

    volume = chaos.load_case(chaos.find_cases(tiny_data[0])[0])
    raw = Segmenter(segmenter.config, segmenter.variables, segmenter.class_names, largest_component=False)
    cleaned = Segmenter(segmenter.config, segmenter.variables, segmenter.class_names, largest_component=True)
    assert segmenter.largest_component is False  # the run's eval.largest_component
    raw_labels = raw.segment_volume(volume)
    np.testing.assert_array_equal(
        cleaned.segment_volume(volume), postprocess.keep_largest_components(raw_labels, range(1, 5))
    )


def test_a_model_trained_on_neighbouring_slices_reads_them_from_the_volume(tiny_data, tmp_path):
    import contextlib
    import io

    from tests.conftest import tiny_config
    from scse_jax import train
    from scse_jax.data import pipeline

    with contextlib.redirect_stdout(io.StringIO()):
        summary = train.train_and_evaluate(tiny_config(*tiny_data, "--config.data.context_slices=1"), tmp_path / "run")
    assert 0.0 <= summary["dice_mean"] <= 1.0
    segmenter = Segmenter.from_checkpoint(tmp_path / "run")
    assert segmenter.variables["params"]["enc1"]["conv1"]["kernel"].shape[-2] == 3
    volume = np.random.default_rng(0).normal(size=(4, 32, 32)).astype(np.float32)
    probs = segmenter.segment(volume, probabilities=True)
    np.testing.assert_array_equal(probs, segmenter.segment(pipeline.with_context(volume, 1), probabilities=True))
    changed = volume.copy()
    changed[1] += 3.0  # a neighbour of slices 0 and 2 only
    moved = np.abs(segmenter.segment(changed, probabilities=True) - probs).max(axis=(1, 2, 3))
    assert moved[0] > 0 and moved[2] > 0 and moved[3] == 0
    with pytest.raises(Exception, match=r"expects .*\(N, 32, 32, 3\)"):
        segmenter.segment(volume[..., None])
    case = chaos.find_cases(tiny_data[0])[0]
    assert segmenter.segment_volume(chaos.load_case(case)).shape == chaos.load_case(case).voxels.shape
