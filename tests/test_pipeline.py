"""Tests of patient splits, class weights, batches, augmentation and prefetching."""

import functools
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scse_jax.data.pipeline import (
    input_channels,
    with_context,
    SliceDataset,
    Split,
    StreamedSliceDataset,
    augment_batch,
    class_counts,
    iterate_batches,
    prefetch,
    split_patients,
    steps_per_epoch,
    streaming_order,
    weights_from_counts,
)
from scse_jax.data.preprocess import PreparedCase, resize_labels
from scse_jax.data.types import Geometry
from scse_jax.errors import ConfigError, DataError

# Splits --------------------------------------------------------------------------------------


@st.composite
def split_arguments(draw):
    num_folds = draw(st.integers(1, 6))
    num_val = draw(st.integers(0, 2))
    minimum = max(num_folds, 1) + num_val + 1
    num_patients = draw(st.integers(minimum + (num_folds > 1), 25))
    return num_patients, num_folds, num_val, draw(st.integers(0, 2**32 - 1))


@settings(deadline=None, max_examples=60)
@given(split_arguments())
def test_splits_are_disjoint_and_test_folds_partition_the_patients(arguments):
    num_patients, num_folds, num_val, seed = arguments
    patients = [str(p) for p in range(1, num_patients + 1)]
    test_sets = []
    for fold in range(num_folds):
        split = split_patients(patients, num_folds=num_folds, fold=fold, num_val=num_val, seed=seed)
        sets = [set(split.train), set(split.val), set(split.test)]
        assert sum(len(s) for s in sets) == num_patients
        assert set().union(*sets) == set(patients)
        assert len(split.val) == num_val and len(split.train) >= 1
        # Determinism: same arguments, any input order -> the same split.
        again = split_patients(
            list(reversed(patients)), num_folds=num_folds, fold=fold, num_val=num_val, seed=seed
        )
        assert again == split
        test_sets.append(set(split.test))
    if num_folds == 1:
        assert test_sets == [set()]
    else:
        assert sum(len(s) for s in test_sets) == num_patients
        assert set().union(*test_sets) == set(patients)
        sizes = [len(s) for s in test_sets]
        assert max(sizes) - min(sizes) <= 1


def test_split_depends_on_the_seed():
    patients = [str(p) for p in range(20)]
    splits = {split_patients(patients, seed=seed).test for seed in range(5)}
    assert len(splits) > 1


def test_split_sets_are_sorted_numerically():
    split = split_patients([str(p) for p in (1, 2, 5, 8, 10, 13, 19, 20, 21, 22)], num_folds=2, num_val=2)
    assert isinstance(split, Split)
    for ids in (split.train, split.val, split.test):
        assert list(ids) == sorted(ids, key=int)


@pytest.mark.parametrize(
    "patients, kwargs, message",
    [
        (["1", "2", "3", "2"], {}, "repeated"),
        (["1", "2", "3", "4", "5", "6"], {"fold": 5}, "fold"),
        (["1", "2", "3", "4", "5", "6"], {"fold": -1}, "fold"),
        (["1", "2", "3"], {"num_folds": 5}, "folds"),
        (["1", "2", "3"], {"num_folds": 3, "num_val": 2}, "too few"),
        (["1", "2"], {"num_folds": 0}, "num_folds"),
    ],
)
def test_bad_split_requests_are_config_errors(patients, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        split_patients(patients, **kwargs)


# Class weights -------------------------------------------------------------------------------


def class_weights(label_arrays, num_classes: int, method: str) -> np.ndarray:
    """Weights of the pixels of several label maps, as the run's data readers compute them."""
    counts = sum((class_counts(labels, num_classes) for labels in label_arrays), np.zeros(num_classes, np.int64))
    return weights_from_counts(counts, method)


def test_class_weights_are_inverse_frequency_summing_to_num_classes():
    labels = [np.array([[0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]), np.array([2, 0])]
    # counts 10, 3, 1 of 14; class 3 absent.
    weights = class_weights(labels, 4, "inverse_frequency")
    expected = np.array([14 / 10, 14 / 3, 14 / 1, 0.0])
    expected *= 4 / expected.sum()
    assert weights.dtype == np.float32
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert weights.sum() == pytest.approx(4.0)


def test_median_frequency_weights_are_median_over_frequency():
    # QuickNAT's class term: counts 10, 3, 1 of 14 -> frequencies f; weight median(f) / f_l.
    labels = [np.array([[0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]), np.array([2, 0])]
    weights = class_weights(labels, 4, "median_frequency")
    np.testing.assert_allclose(weights, [3 / 10, 3 / 3, 3 / 1, 0.0], rtol=1e-6)


def test_no_weighting_gives_present_classes_one():
    labels = [np.array([0, 0, 0, 2])]
    np.testing.assert_array_equal(class_weights(labels, 4, "none"), [1.0, 0.0, 1.0, 0.0])
    with pytest.raises(ConfigError, match="class weighting"):
        class_weights(labels, 4, "sqrt")


def test_class_weights_reject_bad_labels():
    with pytest.raises(DataError, match="label values"):
        class_weights([np.array([0, 5])], 2, "none")
    with pytest.raises(DataError, match="no labelled pixels"):
        class_weights([np.zeros((0,), np.int32)], 2, "none")


# Dataset and batches -------------------------------------------------------------------------


def prepared(key: str, slices: int, size: int = 8, offset: float = 0.0, labelled: bool = True) -> PreparedCase:
    images = offset + np.arange(slices, dtype=np.float32)[:, None, None] * np.ones((1, size, size), np.float32)
    labels = np.full((slices, size, size), int(offset) % 5, np.uint8) if labelled else None
    return PreparedCase(key, key, images, labels, labels, Geometry.from_spacing((1, 1, 1)), (slices, size, size))


def numbered_dataset(count: int = 10, size: int = 8) -> SliceDataset:
    """Example i has every image pixel equal to i and every label equal to i % 5."""
    images = np.broadcast_to(np.arange(count, dtype=np.float32)[:, None, None, None], (count, size, size, 1)).copy()
    labels = np.broadcast_to((np.arange(count) % 5).astype(np.int32)[:, None, None], (count, size, size)).copy()
    return SliceDataset(images, labels)


def example_ids(batch) -> list[int]:
    return [int(v) for v in batch["image"][:, 0, 0, 0]]


def test_dataset_from_cases():
    dataset = SliceDataset.from_cases([prepared("a", 3), prepared("b", 2, offset=10.0)])
    assert len(dataset) == 5
    assert dataset.images.shape == (5, 8, 8, 1) and dataset.images.dtype == np.float32
    assert dataset.labels.shape == (5, 8, 8) and dataset.labels.dtype == np.int32
    np.testing.assert_array_equal(dataset.images[:, 0, 0, 0], [0, 1, 2, 10, 11])
    with pytest.raises(DataError, match="ground truth"):
        SliceDataset.from_cases([prepared("a", 3), prepared("c", 1, labelled=False)])
    with pytest.raises(DataError, match="different grids"):
        SliceDataset.from_cases([prepared("a", 3), prepared("b", 2, size=4)])


def test_datasets_hold_label_shares_when_asked_and_batches_carry_them():
    cases = [prepared("a", 3, offset=2.0), prepared("b", 2, offset=3.0)]
    dataset = SliceDataset.from_cases(cases, share_classes=5)
    streamed = StreamedSliceDataset(5, 8, share_classes=5)
    for case in cases:
        streamed.append_case(case)
    for built in (dataset, streamed):
        assert built.label_shares.shape == (5, 8, 8, 5) and built.label_shares.dtype == np.float32
        np.testing.assert_array_equal(built.label_shares, np.eye(5, dtype=np.float32)[built.labels])
        batch = next(iterate_batches(built, batch_size=4, epoch=0, seed=0))
        np.testing.assert_array_equal(batch["label_shares"], np.eye(5, dtype=np.float32)[batch["label"]])
    assert SliceDataset.from_cases(cases).label_shares is None
    # The shares come from the native labels: a 16 px organ outline halved onto the 8 px grid.
    native = np.zeros((1, 16, 16), np.uint8)
    native[0, 3:11, 5:12] = 2
    case = PreparedCase(
        "c", "c", np.zeros((1, 8, 8), np.float32), resize_labels(native, (8, 8)), native,
        Geometry.from_spacing((1, 1, 1)), (1, 16, 16),
    )
    shares = SliceDataset.from_cases([case], share_classes=3).label_shares[0, ..., 2]
    edge_row = [0.25, 0.5, 0.5, 0.5]  # rows 2-3 and 10-11 of the native grid: half of them organ
    np.testing.assert_array_equal(shares[1:6, 2:6], [edge_row] + [[0.5, 1, 1, 1]] * 3 + [edge_row])
    assert "label_shares" not in next(iterate_batches(SliceDataset.from_cases(cases), batch_size=4, epoch=0, seed=0))


def test_context_channels_are_the_neighbouring_slices_repeated_at_the_ends():
    volume = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    stacked = with_context(volume, 2)
    assert stacked.shape == (4, 2, 2, 5) and stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked[:, 0, 0], [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]])
    np.testing.assert_array_equal(with_context(volume, 0), volume[..., None])
    assert input_channels({"context_slices": 2}) == 5 and input_channels({}) == 1
    with pytest.raises(DataError, match="one volume"):
        with_context(volume[None], 1)


def test_context_channels_never_cross_from_one_case_into_the_next():
    cases = [prepared("a", 3), prepared("b", 2, offset=10.0)]
    dataset = SliceDataset.from_cases(cases, context=1)
    assert dataset.images.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(dataset.images[:, 0, 0], [[0, 0, 1], [0, 1, 2], [1, 2, 2], [10, 10, 11], [10, 11, 11]])
    streamed = StreamedSliceDataset(5, 8, context=1)
    for case in cases:
        streamed.append_case(case)
    np.testing.assert_array_equal(streamed.images, dataset.images)
    np.testing.assert_array_equal(streamed.labels, dataset.labels)


def test_batches_have_the_promised_shapes_and_types():
    batches = list(iterate_batches(numbered_dataset(10), batch_size=4, epoch=0, seed=0))
    assert len(batches) == steps_per_epoch(10, 4) == 2
    for batch in batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (4, 8, 8, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (4, 8, 8) and batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["label"][:, 0, 0], np.array(example_ids(batch)) % 5)
    seen = sum((example_ids(b) for b in batches), [])
    assert len(set(seen)) == 8


def test_epochs_reshuffle_and_repeat_from_the_seed():
    dataset = numbered_dataset(32)

    def order(epoch, seed):
        return sum((example_ids(b) for b in iterate_batches(dataset, batch_size=8, epoch=epoch, seed=seed)), [])

    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == list(range(32))
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != order(0, 1)
    unshuffled = iterate_batches(dataset, batch_size=8, epoch=3, seed=0, shuffle=False)
    assert example_ids(next(unshuffled)) == list(range(8))


def test_two_processes_cover_each_global_batch_exactly():
    dataset = numbered_dataset(20)
    common = dict(batch_size=6, epoch=2, seed=7)
    whole = list(iterate_batches(dataset, **common))
    halves = [list(iterate_batches(dataset, **common, process_index=i, process_count=2)) for i in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(whole) == 3
    for full, first, second in zip(whole, *halves):
        assert first["image"].shape[0] == second["image"].shape[0] == 3
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), full[key])


def test_remainder_batch_when_asked():
    batches = list(iterate_batches(numbered_dataset(10), batch_size=4, epoch=0, seed=0, drop_remainder=False))
    assert [b["image"].shape[0] for b in batches] == [4, 4, 2]
    assert sorted(sum((example_ids(b) for b in batches), [])) == list(range(10))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": 12},  # more than the 10 examples
        {"batch_size": 5, "process_count": 2},
        {"batch_size": 4, "process_index": 2, "process_count": 2},
        {"batch_size": 4, "process_count": 2, "drop_remainder": False},
    ],
)
def test_bad_batch_requests_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        list(iterate_batches(numbered_dataset(10), epoch=0, seed=0, **kwargs))


def test_steps_per_epoch():
    assert steps_per_epoch(100, 8) == 12
    assert steps_per_epoch(100, 8, fixed=30) == 30  # a fixed length, more or fewer than one pass
    assert steps_per_epoch(100, 8, fixed=5) == 5
    with pytest.raises(ConfigError, match="exceeds"):
        steps_per_epoch(3, 8)
    with pytest.raises(ConfigError, match="exceeds"):
        steps_per_epoch(3, 8, fixed=5)


def tag_with_draw(batch, rngs):
    """An "augmentation" that records each example's first uniform draw under "draw"."""
    draws = np.array([generator.uniform() for generator in rngs], np.float32)
    return dict(batch, draw=draws)


def fixed_epoch(dataset, num_steps, **kwargs):
    common = dict(batch_size=8, epoch=3, seed=5, augment=tag_with_draw)
    return list(iterate_batches(dataset, **common, num_steps=num_steps, **kwargs))


def test_a_fixed_epoch_of_one_pass_is_the_usual_epoch_draws_included():
    dataset = numbered_dataset(36)  # 4 full batches of 8, 4 examples left over
    usual = list(iterate_batches(dataset, batch_size=8, epoch=3, seed=5, augment=tag_with_draw))
    fixed = fixed_epoch(dataset, 4)
    assert len(fixed) == len(usual) == 4
    for a, b in zip(usual, fixed):
        assert example_ids(a) == example_ids(b)
        np.testing.assert_array_equal(a["draw"], b["draw"])


def test_a_fixed_epoch_longer_than_a_pass_sees_every_row_then_reshuffles_with_new_draws():
    dataset = numbered_dataset(20)
    batches = fixed_epoch(dataset, 6)  # 48 rows: two passes and 8 rows of a third
    rows = sum((example_ids(b) for b in batches), [])
    draws = np.concatenate([b["draw"] for b in batches])
    assert len(rows) == 48
    assert sorted(rows[:20]) == sorted(rows[20:40]) == list(range(20))
    assert rows[:20] != rows[20:40]
    assert len(set(rows[40:])) == 8
    first_draw = dict(zip(rows[:20], draws[:20]))
    second_draw = dict(zip(rows[20:40], draws[20:40]))
    assert all(first_draw[row] != second_draw[row] for row in range(20))  # a second pass is augmented anew


def test_a_fixed_epoch_shorter_than_a_pass_sees_another_part_of_the_data_each_epoch():
    dataset = numbered_dataset(40)
    seen = [
        set(sum((example_ids(b) for b in iterate_batches(dataset, batch_size=8, epoch=epoch, seed=5, num_steps=2)), []))
        for epoch in (3, 4)
    ]
    assert len(seen[0]) == len(seen[1]) == 16
    assert seen[0] != seen[1]


def test_two_processes_split_a_fixed_epoch_of_repeats_as_one_does():
    dataset = numbered_dataset(12)
    whole = fixed_epoch(dataset, 4)  # 32 rows over 12 examples: every row two or three times
    halves = [fixed_epoch(dataset, 4, process_index=i, process_count=2) for i in range(2)]
    for full, first, second in zip(whole, *halves):
        assert example_ids(first) + example_ids(second) == example_ids(full)
        np.testing.assert_array_equal(np.concatenate([first["draw"], second["draw"]]), full["draw"])


def test_a_fixed_epoch_resumes_mid_epoch_with_the_same_batches():
    dataset = numbered_dataset(12)
    whole = fixed_epoch(dataset, 5)
    resumed = fixed_epoch(dataset, 5, first_step=3)
    assert [example_ids(b) for b in resumed] == [example_ids(b) for b in whole[3:]]
    for a, b in zip(resumed, whole[3:]):
        np.testing.assert_array_equal(a["draw"], b["draw"])


def test_a_fixed_epoch_follows_a_given_first_order_then_reshuffles():
    dataset = numbered_dataset(16)
    first = np.arange(16)[::-1]
    batches = fixed_epoch(dataset, 3, order=first)
    rows = sum((example_ids(b) for b in batches), [])
    assert rows[:16] == list(range(15, -1, -1))
    assert len(set(rows[16:])) == 8


@pytest.mark.parametrize(
    "kwargs", [{"num_steps": 0}, {"num_steps": 2, "drop_remainder": False}, {"num_steps": 2, "shuffle": False}]
)
def test_bad_fixed_epochs_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match="num_steps"):
        list(iterate_batches(numbered_dataset(10), batch_size=4, epoch=0, seed=0, **kwargs))


# Augmentation --------------------------------------------------------------------------------


def left_object_batch(count: int = 6, size: int = 32):
    """A bright square on the left (low column index) labelled 2, one on the right labelled 3."""
    images = np.zeros((count, size, size, 1), np.float32)
    labels = np.zeros((count, size, size), np.int32)
    images[:, 12:20, 4:10] = 1.0
    labels[:, 12:20, 4:10] = 2
    labels[:, 12:20, 22:28] = 3
    return {"image": images, "label": labels}


@pytest.mark.parametrize("modality, spatial_set", [("CT", "small"), ("MR", "small"), ("MR", "wide")])
def test_augmentation_keeps_shapes_values_and_sides(modality, spatial_set):
    batch = left_object_batch()
    for seed in range(10):
        out = augment_batch(batch, np.random.default_rng(seed), modality=modality, spatial_set=spatial_set)
        assert out["image"].shape == batch["image"].shape and out["image"].dtype == np.float32
        assert out["label"].shape == batch["label"].shape and out["label"].dtype == np.int32
        assert set(np.unique(out["label"])) <= {0, 2, 3}
        cols = np.arange(32)
        for example in out["label"]:
            assert (example == 2).any() and (example == 3).any()
            left = cols[(example == 2).any(axis=0)]
            right = cols[(example == 3).any(axis=0)]
            assert left.max() < 16 <= right.min()
        # The image moves with its labels.
        moved = out["image"][..., 0] > out["image"][..., 0].min(axis=(1, 2), keepdims=True) + 0.5
        overlap = (moved & (out["label"] == 2)).sum() / (out["label"] == 2).sum()
        assert overlap > 0.8


def test_wide_spatial_augmentation_zooms_in_and_out_further_than_the_small_one():
    size = 48
    labels = np.zeros((40, size, size), np.int32)
    labels[:, 18:30, 18:30] = 1  # central, so that no zoom or shift pushes it off the grid
    batch = {"image": labels[..., None].astype(np.float32), "label": labels}
    area_ratio = {
        spatial_set: (augment_batch(batch, np.random.default_rng(0), modality="MR", spatial_set=spatial_set)["label"]
                      == 1).sum(axis=(1, 2)) / 144
        for spatial_set in ("small", "wide")
    }
    # Scale s multiplies the area by s**2: small 0.9-1.1, wide 0.7-1.4 (log-uniform); a pixel of slack.
    assert 0.81 * 0.9 <= area_ratio["small"].min() and area_ratio["small"].max() <= 1.21 * 1.1
    assert 0.49 * 0.85 <= area_ratio["wide"].min() and area_ratio["wide"].max() <= 1.96 * 1.1
    assert area_ratio["wide"].min() < 0.7 and area_ratio["wide"].max() > 1.4
    assert (area_ratio["wide"] < 1).sum() >= 12 and (area_ratio["wide"] > 1).sum() >= 12


def test_augmentation_refuses_an_unknown_spatial_set():
    with pytest.raises(ConfigError, match="spatial augmentation must be one of"):
        augment_batch(left_object_batch(), np.random.default_rng(0), modality="MR", spatial_set="huge")


def test_augmentation_moves_every_context_channel_with_the_labels():
    batch = left_object_batch()
    batch["image"] = np.concatenate([batch["image"], 2 * batch["image"], 3 * batch["image"]], axis=-1)
    out = augment_batch(batch, [np.random.default_rng(seed) for seed in range(6)], modality="MR")
    assert out["image"].shape == batch["image"].shape
    base = out["image"][..., 0] - out["image"][..., 0].min(axis=(1, 2), keepdims=True)
    for channel in (1, 2):  # the same warp and the same intensity jitter on every channel
        moved = out["image"][..., channel] - out["image"][..., channel].min(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(moved, (channel + 1) * base, atol=1e-5)
    np.testing.assert_array_equal(out["label"], augment_batch(left_object_batch(), [
        np.random.default_rng(seed) for seed in range(6)], modality="MR")["label"])


def test_augmentation_moves_label_shares_with_the_labels():
    batch = left_object_batch()
    batch["label_shares"] = np.eye(5, dtype=np.float32)[batch["label"]]
    rngs = lambda: [np.random.default_rng(seed) for seed in range(6)]  # noqa: E731
    out = augment_batch(batch, rngs(), modality="MR", intensity_set="gin")
    shares = out["label_shares"]
    assert shares.shape == (6, 32, 32, 5) and shares.dtype == np.float32
    assert shares.min() >= 0 and shares.max() <= 1 + 1e-6
    np.testing.assert_allclose(shares.sum(-1), 1.0, atol=1e-5)
    # Bilinear shares and nearest labels of one transform: the same organs, the same places.
    assert np.mean(shares.argmax(-1) == out["label"]) > 0.97
    for class_id in (2, 3):
        area = (out["label"] == class_id).sum(axis=(1, 2))
        np.testing.assert_allclose(shares[..., class_id].sum(axis=(1, 2)), area, rtol=0.15)
    # Moved bilinearly: outline pixels of the moved organs share between classes.
    outline = (shares[..., 2] > 0) & (shares[..., 2] < 1)
    assert outline.any(axis=(1, 2)).all()
    without = augment_batch(left_object_batch(), rngs(), modality="MR", intensity_set="gin")
    np.testing.assert_array_equal(out["label"], without["label"])
    np.testing.assert_array_equal(out["image"], without["image"])


def test_augmentation_changes_examples_reproducibly():
    batch = left_object_batch()
    first = augment_batch(batch, np.random.default_rng(1), modality="MR")
    again = augment_batch(batch, np.random.default_rng(1), modality="MR")
    other = augment_batch(batch, np.random.default_rng(2), modality="MR")
    np.testing.assert_array_equal(first["image"], again["image"])
    assert not np.array_equal(first["image"], batch["image"])
    assert not np.array_equal(first["label"], other["label"])
    assert not np.array_equal(first["label"][0], first["label"][1])  # per-example transforms


def test_iterate_batches_applies_augmentation_per_step():
    batch = left_object_batch(8)
    dataset = SliceDataset(images=batch["image"], labels=batch["label"])
    calls = []

    def augment(batch, rngs):
        calls.append(tuple(rng.integers(1 << 30) for rng in rngs))
        return augment_batch(batch, rngs, modality="CT")

    batches = list(iterate_batches(dataset, batch_size=4, epoch=0, seed=0, augment=augment))
    assert len(batches) == 2 and len(set(calls)) == 2 and len(calls[0]) == 4
    assert batches[0]["image"].shape == (4, 32, 32, 1)


def test_augmented_global_batch_does_not_depend_on_the_process_split():
    batch = left_object_batch(8)
    dataset = SliceDataset(images=batch["image"], labels=batch["label"])
    common = dict(batch_size=4, epoch=1, seed=3, augment=functools.partial(augment_batch, modality="MR"))
    whole = list(iterate_batches(dataset, **common))
    halves = [list(iterate_batches(dataset, **common, process_index=i, process_count=2)) for i in range(2)]
    for full, first, second in zip(whole, *halves):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), full[key])


# Prefetch ------------------------------------------------------------------------------------


def test_prefetch_yields_everything_in_order():
    assert list(prefetch(iter(range(50)), size=3)) == list(range(50))


def test_prefetch_raises_the_producer_error_after_the_good_items():
    def failing():
        yield 1
        yield 2
        raise DataError("broken slice")

    got = []
    with pytest.raises(DataError, match="broken slice"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_stops_its_thread_when_closed_early():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = set(threading.enumerate())
    stream = prefetch(endless(), size=2)
    assert next(stream) == 0
    # this thread by itself: other tests' threads may start or end meanwhile
    [producer] = [t for t in threading.enumerate() if t not in before and t.name == "prefetch"]
    stream.close()
    producer.join(timeout=30)
    assert not producer.is_alive()
    assert len(produced) <= 5  # bounded by the queue, not run ahead


def test_first_step_resumes_an_epoch_with_the_same_batches():
    batch = left_object_batch(12)
    dataset = SliceDataset(images=batch["image"], labels=batch["label"])
    dataset.images[:, 0, 0, 0] = np.arange(12)  # tell examples apart
    common = dict(batch_size=4, epoch=5, seed=9, augment=lambda b, rng: augment_batch(b, rng, modality="MR"))
    whole = list(iterate_batches(dataset, **common))
    resumed = list(iterate_batches(dataset, **common, first_step=1))
    assert len(resumed) == len(whole) - 1 == 2
    for expected, got in zip(whole[1:], resumed):
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])


# Streaming the first epoch --------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    buffer_size=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_streaming_order_is_a_permutation_that_reads_only_within_its_buffer(lengths, buffer_size, seed):
    order = streaming_order(lengths, buffer_size=buffer_size, seed=seed)
    total = sum(lengths)
    assert sorted(order.tolist()) == list(range(total))
    assert np.all(order < np.arange(total) + buffer_size)  # position i needs only rows < i + buffer
    np.testing.assert_array_equal(order, streaming_order(lengths, buffer_size=buffer_size, seed=seed))


def test_streaming_order_mixes_cases():
    order = streaming_order([30] * 8, buffer_size=60, seed=0)
    cases_per_batch = [len(set(order[i : i + 20] // 30)) for i in range(0, 240, 20)]
    assert min(cases_per_batch) >= 2 and np.mean(cases_per_batch) >= 3
    assert not np.array_equal(order, streaming_order([30] * 8, buffer_size=60, seed=1))
    with pytest.raises(ConfigError, match="buffer_size"):
        streaming_order([3], buffer_size=0, seed=0)


class WatchedDataset(StreamedSliceDataset):
    """Sets `waiting` once a reader asks for rows not filled yet."""

    def __init__(self, *args):
        super().__init__(*args)
        self.waiting = threading.Event()

    def wait_for_rows(self, stop: int) -> None:
        if stop > self.rows_filled:
            self.waiting.set()
        super().wait_for_rows(stop)


def test_batches_of_a_streamed_dataset_wait_only_for_their_own_rows():
    dataset = WatchedDataset(12, 8)
    cases = [prepared("a", 4, offset=0.0), prepared("b", 4, offset=4.0), prepared("c", 4, offset=8.0)]
    order = streaming_order([4, 4, 4], buffer_size=2, seed=0)
    batches = iterate_batches(dataset, batch_size=2, epoch=0, seed=0, order=order)
    dataset.append_case(cases[0])
    got = [next(batches)]  # positions 0 and 1 read rows below 3: case "a" is enough

    reader = threading.Thread(target=lambda: got.extend(batches))
    reader.start()
    assert dataset.waiting.wait(timeout=60)  # some batch needs a row of case "b", not read yet
    reader.join(timeout=0.5)  # time for a reader that does not wait to run ahead; one that waits cannot end
    assert reader.is_alive()
    assert all(row < 4 for batch in got for row in example_ids(batch))
    dataset.append_case(cases[1])
    dataset.append_case(cases[2])
    reader.join(timeout=60)
    assert not reader.is_alive()
    ids = sum((example_ids(b) for b in got), [])
    assert ids == order.tolist()  # example i holds pixel value i: rows land in case order
    np.testing.assert_array_equal(dataset.labels[:, 0, 0], [0] * 4 + [4] * 4 + [3] * 4)


def test_a_fixed_epoch_longer_than_a_pass_streams_its_first_pass_then_reshuffles_every_row():
    dataset = StreamedSliceDataset(8, 8)
    cases = [prepared("a", 4, offset=0.0), prepared("b", 4, offset=4.0)]
    order = streaming_order([4, 4], buffer_size=2, seed=0)
    batches = iterate_batches(dataset, batch_size=4, epoch=0, seed=0, order=order, num_steps=3)
    dataset.append_case(cases[0])
    got = []
    reader = threading.Thread(target=lambda: got.extend(batches))
    reader.start()
    reader.join(timeout=0.5)
    assert reader.is_alive()  # waiting for case "b"
    dataset.append_case(cases[1])
    reader.join(timeout=60)
    assert not reader.is_alive()
    ids = sum((example_ids(b) for b in got), [])
    assert ids[:8] == order.tolist() and len(set(ids[8:])) == 4


def test_a_failed_producer_reaches_the_waiting_reader():
    dataset = WatchedDataset(8, 8)
    dataset.append_case(prepared("a", 4))
    batches = iterate_batches(dataset, batch_size=4, epoch=0, seed=0, order=np.arange(8))
    next(batches)

    def fail_once_the_reader_waits():
        dataset.waiting.wait(timeout=60)
        dataset.fail(DataError("image_9.dcm: truncated"))

    threading.Thread(target=fail_once_the_reader_waits, daemon=True).start()
    with pytest.raises(DataError, match="could not be prepared: image_9.dcm: truncated"):
        next(batches)


def test_a_streamed_dataset_refuses_cases_that_do_not_fit():
    dataset = StreamedSliceDataset(5, 8)
    dataset.append_case(prepared("a", 3))
    with pytest.raises(DataError, match="does not fit rows 3..6"):
        dataset.append_case(prepared("b", 3))
    with pytest.raises(DataError, match="does not fit"):
        dataset.append_case(prepared("c", 2, size=4))
    with pytest.raises(DataError, match="without ground truth"):
        dataset.append_case(prepared("d", 2, labelled=False))
    with pytest.raises(ConfigError, match="each of the 5 rows once"):
        next(iterate_batches(dataset, batch_size=1, epoch=0, seed=0, order=np.arange(4)))
