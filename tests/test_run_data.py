"""A run's data prepared in the background: class weights first, then cases as training needs them."""

import dataclasses
import threading

import numpy as np
import pytest

from tests.conftest import tiny_config
from scse_jax.data import chaos, pipeline
from scse_jax.data.run_data import StreamedRunData, check_training_labels, plan_run_data, prepare_run_data
from scse_jax.data.types import CLASS_NAMES
from scse_jax.errors import DataError


def test_streamed_data_equals_the_data_prepared_whole(tiny_data):
    config = tiny_config(*tiny_data)
    plan = plan_run_data(config)
    whole = prepare_run_data(plan, config)
    streamed = StreamedRunData(plan, config)
    data = streamed.result()

    np.testing.assert_array_equal(streamed.class_weights(), whole.class_weights)
    assert sorted(c.key for c in streamed.train_cases) == sorted(c.key for c in plan.cases_of(plan.split.train))
    for held_out in ("val", "test"):
        assert [c.case_key for c in getattr(data, held_out)] == [c.case_key for c in getattr(whole, held_out)]
    assert data.val
    assert len(data.train) == len(whole.train) == plan.num_train_slices()
    # rows follow the streamed case order; as a set they are the whole dataset's rows
    key_of = lambda images: images.tobytes()  # noqa: E731
    assert sorted(map(key_of, data.train.images)) == sorted(map(key_of, whole.train.images))
    order = streamed.first_epoch_order()
    assert sorted(order.tolist()) == list(range(len(data.train)))
    config.data.stream_first_epoch = False
    assert streamed.first_epoch_order() is None


@pytest.mark.parametrize("weighting", pipeline.CLASS_WEIGHTINGS)
def test_training_weighs_classes_as_the_config_says(tiny_data, weighting, capsys):
    config = tiny_config(*tiny_data, f"--config.train.class_weighting={weighting}")
    plan = plan_run_data(config)
    whole = prepare_run_data(plan, config)
    counts = pipeline.class_counts(whole.train.labels, len(plan.class_names))
    expected = pipeline.weights_from_counts(counts, weighting)
    np.testing.assert_array_equal(whole.class_weights, expected)
    np.testing.assert_array_equal(StreamedRunData(plan, config).class_weights(), expected)
    if weighting == "none":
        np.testing.assert_array_equal(expected, np.ones(len(plan.class_names)))
    else:  # the rarest class weighs most
        assert expected.argmax() == counts.argmin() and expected[0] == expected.min()
    assert f"class weights ({weighting})" in capsys.readouterr().err


def test_the_first_batch_trains_before_the_last_case_is_read(tiny_data, tmp_path, monkeypatch):
    config = tiny_config(tiny_data[0], tmp_path / "cold_cache", "--config.train.batch_size=4")
    plan = plan_run_data(config)
    release = threading.Event()
    load_case = chaos.load_case
    # Known from the plan, so the reader never looks at the object it is still being built into.
    train_keys = {case.key for case in plan.cases_of(plan.split.train)}
    train_loads = []

    def slow_for_the_last_case(case, **kwargs):
        if case.key in train_keys:
            train_loads.append(case.key)
            if len(train_loads) == len(train_keys):
                assert release.wait(timeout=60)
        return load_case(case, **kwargs)

    monkeypatch.setattr(chaos, "load_case", slow_for_the_last_case)
    streamed = StreamedRunData(plan, config)
    try:
        batches = pipeline.iterate_batches(
            streamed.train, batch_size=4, epoch=0, seed=0, order=streamed.first_epoch_order()
        )
        first = next(batches)
        assert streamed.train.rows_filled < len(streamed.train)  # the last case is still being read
        assert first["image"].shape == (4, 32, 32, 1) and np.abs(first["image"]).sum() > 0
    finally:
        release.set()
    assert len(list(batches)) == len(streamed.train) // 4 - 1
    assert streamed.result().train is streamed.train
    assert train_loads == [case.key for case in streamed.train_cases]  # the held-back case was read last


def test_a_case_that_fails_to_decode_stops_the_readers(tiny_data, tmp_path, monkeypatch):
    config = tiny_config(tiny_data[0], tmp_path / "cold_cache")
    plan = plan_run_data(config)

    def broken(case, **kwargs):
        raise DataError(f"{case.image_files[0]}: truncated")

    monkeypatch.setattr(chaos, "load_case", broken)
    streamed = StreamedRunData(plan, config)
    assert streamed.class_weights().shape == (5,)  # label maps alone still read
    with pytest.raises(DataError, match="could not be prepared: .*truncated"):
        next(pipeline.iterate_batches(streamed.train, batch_size=8, epoch=0, seed=0))
    with pytest.raises(DataError, match="truncated"):
        streamed.result()


def test_labels_that_change_after_the_class_weights_are_refused(tiny_data, tmp_path, monkeypatch):
    config = tiny_config(tiny_data[0], tmp_path / "cold_cache")
    plan = plan_run_data(config)
    load_case = chaos.load_case

    def labels_changed(case, **kwargs):
        volume = load_case(case, **kwargs)
        return dataclasses.replace(volume, labels=np.zeros_like(volume.labels))

    monkeypatch.setattr(chaos, "load_case", labels_changed)
    streamed = StreamedRunData(plan, config)
    with pytest.raises(DataError, match="did the data change during the run"):
        streamed.result()


def test_training_labels_without_any_organ_are_refused_before_training(tiny_data, tmp_path, monkeypatch):
    config = tiny_config(tiny_data[0], tmp_path / "cold_cache")
    plan = plan_run_data(config)
    load_labels = chaos.load_labels
    monkeypatch.setattr(chaos, "load_labels", lambda case: np.zeros_like(load_labels(case)))
    with pytest.raises(DataError, match="the 2 training label maps hold only background, no liver/right_kidney/"):
        StreamedRunData(plan, config).class_weights()  # what training waits for before its first step


def test_an_organ_absent_from_every_training_map_is_warned_of(capsys):
    check_training_labels(np.array([900, 50, 20, 30, 0]), CLASS_NAMES, 3)
    assert capsys.readouterr().err == (
        "warning: no spleen voxel in the 3 training label maps: the network cannot learn to find it\n"
    )


@pytest.mark.parametrize("problem", ["singular affine", "RGB labels"])
def test_a_bad_nifti_header_of_a_test_patient_stops_the_run_at_planning(tmp_path, problem):
    """Not after the first epoch, when the held-out patients are first read."""
    nibabel = pytest.importorskip("nibabel")
    folder = tmp_path / "nifti"
    folder.mkdir()
    for patient in range(1, 6):
        label = np.zeros((8, 8, 3), np.uint8)
        label[2:5, 2:5] = 1
        nibabel.save(nibabel.Nifti1Image(np.ones((8, 8, 3), np.float32), np.eye(4)), folder / f"image_{patient}.nii.gz")
        nibabel.save(nibabel.Nifti1Image(label, np.eye(4)), folder / f"label_{patient}.nii.gz")
    config = tiny_config(folder, tmp_path / "cache")
    patient = plan_run_data(config).split.test[0]
    if problem == "RGB labels":
        bad = folder / f"label_{patient}.nii.gz"
        rgb = np.zeros((8, 8, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        nibabel.save(nibabel.Nifti1Image(rgb, np.eye(4)), bad)
    else:
        bad = folder / f"image_{patient}.nii.gz"
        image = nibabel.load(bad)
        image.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=2)
        image.header.set_qform(None, code=0)
        nibabel.save(nibabel.Nifti1Image(np.ones((8, 8, 3), np.float32), None, image.header), bad)
    with pytest.raises(DataError, match=bad.name):
        plan_run_data(config)
