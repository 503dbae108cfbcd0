"""Largest-component post-processing and the volume analysis of a prediction."""

import argparse

import numpy as np
import pytest

from scipy import ndimage

from scse_jax import metrics, postprocess
from scse_jax.data.preprocess import resize_labels, resize_probabilities


def test_keeps_each_organs_largest_component_and_removes_a_planted_island():
    labels = np.zeros((6, 10, 10), np.uint8)
    labels[1:5, 2:6, 2:6] = 1  # the liver
    labels[0, 8:10, 8:10] = 1  # an island of "liver" elsewhere
    labels[2:4, 7:9, 1:3] = 2  # a kidney, one component
    cleaned = postprocess.keep_largest_components(labels, [1, 2])
    expected = labels.copy()
    expected[0, 8:10, 8:10] = 0
    np.testing.assert_array_equal(cleaned, expected)
    np.testing.assert_array_equal(postprocess.keep_largest_components(labels, [2]), labels)  # class 1 untouched


def test_components_touching_only_at_a_corner_are_separate():
    labels = np.zeros((1, 4, 4), np.uint8)
    labels[0, 0:2, 0:2] = 3
    labels[0, 2, 2] = 3  # touches the square diagonally only
    assert postprocess.keep_largest_components(labels, [3]).sum() == 4 * 3


def test_to_native_resizes_probabilities_and_optionally_cleans():
    grid = np.zeros((2, 4, 4), np.uint8)
    grid[:, :2, :2] = 1
    grid[1, 3, 3] = 1
    probabilities = np.eye(2, dtype=np.float32)[grid]
    raw = postprocess.to_native(probabilities, (8, 8), largest_component=False)
    cleaned = postprocess.to_native(probabilities, (8, 8), largest_component=True)
    assert raw.shape == cleaned.shape == (2, 8, 8) and raw.dtype == np.uint8
    assert raw[1, 6:, 6:].all() and not cleaned[1, 6:, 6:].any()
    np.testing.assert_array_equal(cleaned[:, :4, :4], raw[:, :4, :4])


def test_an_organ_taken_to_the_training_grid_and_back_keeps_its_place_and_outline():
    rows, cols = np.mgrid[0:64, 0:64]
    disk = (((rows - 30.3) ** 2 + (cols - 25.8) ** 2) < 14.2**2)[None].astype(np.uint8)
    on_grid = resize_labels(disk, (32, 32))
    back = postprocess.to_native(np.eye(2, dtype=np.float32)[on_grid], (64, 64), largest_component=False)
    shift = np.array(ndimage.center_of_mass(back[0])) - np.array(ndimage.center_of_mass(disk[0]))
    assert np.abs(shift).max() < 0.2  # nearest neighbour both ways: 0.52 and 0.35 native pixels
    dice = 2 * (back & disk).sum() / (back.sum() + disk.sum())
    assert dice > 0.968  # nearest neighbour both ways: 0.965


def test_to_native_resizes_long_volumes_in_pieces_alike():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(3), size=(40, 6, 6)).astype(np.float32)
    whole = postprocess.to_native(probabilities, (9, 12), largest_component=False)
    np.testing.assert_array_equal(whole, resize_probabilities(probabilities, (9, 12)).argmax(-1))
    assert whole.shape == (40, 9, 12)
    with pytest.raises(ValueError, match="probabilities"):
        postprocess.to_native(probabilities.argmax(-1), (9, 12), largest_component=False)


def test_largest_component_flag_defaults_to_the_runs_setting():
    parser = argparse.ArgumentParser()
    postprocess.add_largest_component_flag(parser)
    assert parser.parse_args([]).largest_component is None
    assert parser.parse_args(["--largest-component"]).largest_component is True
    assert parser.parse_args(["--no-largest-component"]).largest_component is False


def test_volume_analysis_places_each_false_positive_once():
    truth = np.zeros((4, 12, 12), np.uint8)
    truth[1:3, 3:7, 3:7] = 1  # 32 voxels of class 1
    truth[1:3, 9:11, 9:11] = 2  # another organ
    prediction = truth.copy()
    prediction[0, 3:5, 3:5] = 1  # 4 voxels on a slice without the organ
    prediction[1, 9:11, 9:11] = 1  # 4 voxels on the other organ
    prediction[1, 7, 3:7] = 1  # 4 voxels just outside the outline
    prediction[2, 0, 11] = 1  # 1 voxel far away
    prediction[2, 3, 3] = 0  # 1 voxel missed
    result = metrics.volume_analysis(prediction, truth, 1)
    assert result["fp_off_slices"] == pytest.approx(4 / 32)
    assert result["fp_other_organs"] == pytest.approx(4 / 32)
    assert result["fp_boundary"] == pytest.approx(4 / 32)
    assert result["fp_elsewhere"] == pytest.approx(1 / 32)
    assert result["volume_ratio"] == pytest.approx((31 + 13) / 32)
    sites = sum(result[name] for name in metrics.FALSE_POSITIVE_SITES)
    assert result["volume_ratio"] == pytest.approx(31 / 32 + sites)


def test_volume_analysis_of_an_absent_class_is_nan():
    result = metrics.volume_analysis(np.ones((2, 3, 3)), np.zeros((2, 3, 3)), 1)
    assert all(np.isnan(value) for value in result.values())
