"""The CHAOS metrics against hand-computed cases."""

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from scse_jax import metrics
from scse_jax.data.types import Geometry
from scse_jax.errors import ConfigError, DataError


def cube(shape, corner, side):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(c, c + side) for c in corner)] = True
    return mask


def shifted_cube_assd(side: int, step_mm: float) -> float:
    """ASSD of a cube against itself moved one voxel along its smallest-spacing axis.

    Both surfaces share the 4 (side-1)^2 side-face voxels in the overlap (distance 0); the
    two end faces (side^2 and (side-2)^2 voxels per cube, the ring of the inner end face being
    shared) are one step from the other cube's surface.
    """
    moved = side**2 + (side - 2) ** 2
    shell = side**3 - (side - 2) ** 3
    return step_mm * moved / shell


@pytest.mark.parametrize(
    "axis, spacing",
    [(0, (0.5, 0.9, 0.8)), (1, (3.0, 0.5, 0.8)), (2, (3.0, 0.9, 0.6))],
)
def test_cube_shifted_by_one_voxel(axis, spacing):
    side = 6
    gt = cube((12, 12, 12), (3, 3, 3), side)
    pred = np.roll(gt, 1, axis=axis)
    scores = metrics.binary_scores(pred, gt, spacing)
    assert scores["assd"] == pytest.approx(shifted_cube_assd(side, spacing[axis]))
    assert scores["mssd"] == pytest.approx(spacing[axis])
    overlap = side**2 * (side - 1)
    assert scores["dice"] == pytest.approx(2 * overlap / (2 * side**3))
    assert scores["jaccard"] == pytest.approx(overlap / (2 * side**3 - overlap))
    assert scores["ravd"] == 0.0


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_slab_shifted_along_the_coarse_axis(shift):
    # A slab across whole slices: with the array edge counted as inside, its surface is only
    # its two end layers, each exactly `shift` slices from the other slab's.
    spacing = (2.5, 0.7, 0.7)
    gt = np.zeros((20, 8, 9), dtype=bool)
    gt[4:12] = True
    pred = np.roll(gt, shift, axis=0)
    scores = metrics.binary_scores(pred, gt, spacing)
    assert scores["assd"] == pytest.approx(shift * 2.5)
    assert scores["mssd"] == pytest.approx(shift * 2.5)


def test_identical_masks_are_perfect():
    gt = cube((10, 10, 10), (2, 3, 1), 5)
    scores = metrics.binary_scores(gt, gt.copy(), (1.0, 1.0, 1.0))
    assert scores == {"dice": 1.0, "jaccard": 1.0, "ravd": 0.0, "assd": 0.0, "mssd": 0.0}


@pytest.mark.parametrize("pred_voxels, expected_ravd", [(90, 10.0), (125, 25.0), (100, 0.0)])
def test_ravd_is_the_relative_volume_difference_in_percent(pred_voxels, expected_ravd):
    gt = np.zeros((2, 10, 20), dtype=bool)
    gt[0, :, :10] = True  # 100 voxels
    pred = np.zeros_like(gt)
    pred.reshape(-1)[:pred_voxels] = True
    assert metrics.binary_scores(pred, gt, (1.0, 1.0, 1.0))["ravd"] == pytest.approx(expected_ravd)


def test_distances_follow_the_geometry_not_the_index_grid():
    spacing = (2.0, 0.8, 0.6)
    gt = cube((12, 12, 12), (3, 3, 3), 5)
    pred = cube((12, 12, 12), (4, 2, 3), 6)
    axis_aligned = metrics.binary_scores(pred, gt, spacing)
    # The same grid rotated and moved in patient space: distances must not change.
    affine = Geometry.from_spacing(spacing).index_to_patient.copy()
    affine[:3, :3] = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix() @ affine[:3, :3]
    affine[:3, 3] = [-120.0, 40.0, 1690.5]
    rotated = metrics.binary_scores(pred, gt, Geometry(spacing, affine))
    for name in metrics.METRIC_NAMES:
        assert rotated[name] == pytest.approx(axis_aligned[name])
    assert axis_aligned["assd"] > 0
    isotropic = metrics.binary_scores(pred, gt, (1.0, 1.0, 1.0))
    assert isotropic["assd"] != pytest.approx(axis_aligned["assd"])


def test_surface_is_what_one_six_connected_erosion_removes():
    rng = np.random.default_rng(0)
    mask = rng.random((7, 8, 9)) < 0.6
    padded = np.pad(mask, 1, constant_values=True)  # outside the array counts as inside
    center = padded[1:-1, 1:-1, 1:-1]
    all_neighbours_inside = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            all_neighbours_inside &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    expected = np.argwhere(center & ~all_neighbours_inside)
    found = metrics.surface_voxels(mask)
    assert sorted(map(tuple, found)) == sorted(map(tuple, expected))


def test_surface_of_small_cube_and_of_full_array():
    # A 3x3x3 cube: every voxel but the centre has a face neighbour outside.
    surface = metrics.surface_voxels(cube((5, 5, 5), (1, 1, 1), 3))
    assert len(surface) == 26
    assert (2, 2, 2) not in set(map(tuple, surface))
    # The array's edge counts as inside: a full array has no surface, and a cube in a corner
    # only has its three inner faces (the voxels with some index 2: 27 - 2**3).
    assert len(metrics.surface_voxels(np.ones((4, 4, 4), dtype=bool))) == 0
    assert len(metrics.surface_voxels(cube((5, 5, 5), (0, 0, 0), 3))) == 19


def test_empty_mask_policy():
    gt = cube((6, 6, 6), (1, 1, 1), 3)
    empty = np.zeros_like(gt)
    spacing = (1.0, 1.0, 1.0)
    assert metrics.binary_scores(empty, empty, spacing) == {
        "dice": 1.0, "jaccard": 1.0, "ravd": 0.0, "assd": 0.0, "mssd": 0.0
    }
    missed = metrics.binary_scores(empty, gt, spacing)
    assert (missed["dice"], missed["jaccard"], missed["ravd"]) == (0.0, 0.0, 100.0)
    assert math.isinf(missed["assd"]) and math.isinf(missed["mssd"])
    invented = metrics.binary_scores(gt, empty, spacing)
    assert (invented["dice"], invented["jaccard"]) == (0.0, 0.0)
    assert math.isinf(invented["ravd"]) and math.isinf(invented["assd"]) and math.isinf(invented["mssd"])


def test_score_volume_scores_each_class_separately():
    gt = np.zeros((8, 8, 8), dtype=np.uint8)
    gt[1:4, 1:4, 1:4] = 1
    gt[5:8, 5:8, 5:8] = 3
    pred = gt.copy()
    pred[1, 1, 1] = 0
    pred[0, 0, 0] = 2
    spacing = (2.0, 1.0, 1.0)
    scores = metrics.score_volume(pred, gt, spacing)
    assert list(scores) == [1, 2, 3]
    assert scores[1] == metrics.binary_scores(pred == 1, gt == 1, spacing)
    assert scores[1]["dice"] == pytest.approx(2 * 26 / 53)
    assert scores[3]["dice"] == 1.0
    assert scores[2]["dice"] == 0.0 and math.isinf(scores[2]["ravd"])
    assert list(metrics.score_volume(pred, gt, spacing, class_ids=[3])) == [3]


def test_shape_mismatch_and_bad_spacing_are_reported():
    with pytest.raises(DataError, match="shape"):
        metrics.binary_scores(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), (1, 1, 1))
    with pytest.raises(ConfigError, match="spacing"):
        metrics.binary_scores(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), (1, 0, 1))


@pytest.mark.parametrize(
    "name, value, points",
    [
        ("dice", 1.0, 100.0), ("dice", 0.9, 50.0), ("dice", 0.8, 0.0), ("dice", 0.5, 0.0),
        ("ravd", 0.0, 100.0), ("ravd", 2.5, 50.0), ("ravd", 7.0, 0.0), ("ravd", math.inf, 0.0),
        ("assd", 3.0, 80.0), ("assd", 15.0, 0.0), ("assd", math.inf, 0.0),
        ("mssd", 30.0, 50.0), ("mssd", 90.0, 0.0), ("mssd", math.nan, 0.0),
    ],
)
def test_chaos_score(name, value, points):
    assert metrics.chaos_score(name, value) == pytest.approx(points)


def test_chaos_score_has_no_jaccard():
    with pytest.raises(ConfigError, match="jaccard"):
        metrics.chaos_score("jaccard", 0.9)
