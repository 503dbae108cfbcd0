"""The CHAOS challenge's segmentation metrics, in voxels, per cent and millimetres.

Definitions follow the challenge's own evaluation code (github.com/emrekavur/CHAOS-evaluation,
``CHAOSMetrics.m`` and ``Python/CHAOSmetrics.py``):

- Dice = 2|P & G| / (|P| + |G|); Jaccard = |P & G| / |P | G| (voxel counts).
- RAVD = |  |G| - |P|  | / |G| * 100, in per cent.
- Surface voxels: the voxels of a mask removed by one binary erosion with the 6-connected
  structuring element (MATLAB ``strel('sphere', 1)``), with everything outside the array
  counted as inside the mask (MATLAB ``imerode`` pads binary images with 1; scipy
  ``border_value=1``). A mask touching the array's edge therefore has no surface there.
- Surface voxel indices are mapped to patient coordinates in mm with the volume's geometry;
  for DICOM series that geometry comes from the first file's orientation and pixel spacing
  and the slice step (last position - first position) / (N - 1), files in sorted name order.
  (The official transform pairs the row index with the row direction cosine, swapping the
  in-plane directions of DICOM PS3.3 C.7.6.2.1.1, which Geometry follows; the two differ by a
  reflection in the image plane, so distances agree whenever slices are not sheared.)
- ASSD: the mean, over the surface voxels of both masks, of the distance to the nearest
  surface voxel of the other mask. MSSD: the largest of those distances.

Empty masks (the official code divides by zero or returns a volume-size "worst" distance):

- both empty: dice = jaccard = 1, ravd = 0, assd = mssd = 0 (nothing to find, nothing missed);
- prediction empty, ground truth not: dice = jaccard = 0, ravd = 100, assd = mssd = inf;
- ground truth empty, prediction not: dice = jaccard = 0, ravd = inf, assd = mssd = inf.

``inf`` means "no surface to measure to"; :func:`chaos_score` turns it into 0 points.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from scse_jax.data.types import Geometry
from scse_jax.errors import ConfigError, DataError

METRIC_NAMES = ("dice", "jaccard", "ravd", "assd", "mssd")

# CHAOS scoring: metric value -> 0..100 points, linear between the perfect value (100 points)
# and the threshold (0 points), clipped; from the challenge's evaluation description.
CHAOS_SCORE_RANGES = {
    "dice": (1.0, 0.8),
    "ravd": (0.0, 5.0),
    "assd": (0.0, 15.0),
    "mssd": (0.0, 60.0),
}

_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


def as_geometry(geometry_or_spacing: Geometry | Sequence[float]) -> Geometry:
    """A Geometry as given, or an axis-aligned one from (slice, row, col) spacing in mm."""
    if isinstance(geometry_or_spacing, Geometry):
        return geometry_or_spacing
    spacing = tuple(float(s) for s in geometry_or_spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ConfigError(f"spacing must be three positive numbers in mm, got {geometry_or_spacing!r}")
    return Geometry.from_spacing(spacing)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """(N, 3) indices of the voxels that one 6-connected erosion removes (edges count as inside)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise DataError(f"surface_voxels needs a 3-D mask, got shape {mask.shape}")
    other_axes = ((1, 2), (0, 2), (0, 1))
    present = [np.flatnonzero(mask.any(axis=axes)) for axes in other_axes]
    if present[0].size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    # Erode only the bounding box plus one voxel: outside it the mask is empty, so the result
    # is the same as eroding the whole array, at a fraction of the cost.
    lower = [max(int(axis[0]) - 1, 0) for axis in present]
    upper = [min(int(axis[-1]) + 2, size) for axis, size in zip(present, mask.shape)]
    box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper))
    cropped = mask[box]
    # The crop's faces are either true array edges (padded as inside, like the whole array)
    # or a layer of background voxels, which erosion leaves background.
    surface = cropped & ~ndimage.binary_erosion(cropped, structure=_SIX_CONNECTED, border_value=1)
    return np.argwhere(surface) + np.asarray(lower)


def surface_distances(pred_mask: np.ndarray, gt_mask: np.ndarray, geometry: Geometry | Sequence[float]):
    """Nearest-surface distances in mm: (prediction -> ground truth, ground truth -> prediction)."""
    geometry = as_geometry(geometry)
    pred_points = geometry.to_patient_mm(surface_voxels(pred_mask))
    gt_points = geometry.to_patient_mm(surface_voxels(gt_mask))
    if len(pred_points) == 0 or len(gt_points) == 0:
        raise DataError("surface distances need two non-empty masks")
    pred_to_gt, _ = cKDTree(gt_points).query(pred_points)
    gt_to_pred, _ = cKDTree(pred_points).query(gt_points)
    return pred_to_gt, gt_to_pred


def binary_scores(
    pred_mask: np.ndarray, gt_mask: np.ndarray, geometry: Geometry | Sequence[float]
) -> dict[str, float]:
    """Dice, Jaccard, RAVD (%), ASSD and MSSD (mm) of one binary prediction against its ground truth.

    Args:
      pred_mask, gt_mask: (slices, rows, cols) arrays, nonzero = inside; same shape.
      geometry: a Geometry, or (slice, row, col) spacing in mm for an axis-aligned grid.

    Returns:
      {"dice", "jaccard", "ravd", "assd", "mssd"} as floats; empty masks as in the module
      docstring.
    """
    geometry = as_geometry(geometry)
    pred_mask = np.asarray(pred_mask, dtype=bool)
    gt_mask = np.asarray(gt_mask, dtype=bool)
    if pred_mask.shape != gt_mask.shape:
        raise DataError(f"prediction shape {pred_mask.shape} differs from ground truth shape {gt_mask.shape}")
    pred_count = int(np.count_nonzero(pred_mask))
    gt_count = int(np.count_nonzero(gt_mask))
    if pred_count == 0 and gt_count == 0:
        return {"dice": 1.0, "jaccard": 1.0, "ravd": 0.0, "assd": 0.0, "mssd": 0.0}
    if pred_count == 0 or gt_count == 0:
        ravd = 100.0 if gt_count else math.inf
        return {"dice": 0.0, "jaccard": 0.0, "ravd": ravd, "assd": math.inf, "mssd": math.inf}
    overlap = int(np.count_nonzero(pred_mask & gt_mask))
    pred_to_gt, gt_to_pred = surface_distances(pred_mask, gt_mask, geometry)
    return {
        "dice": 2.0 * overlap / (pred_count + gt_count),
        "jaccard": overlap / (pred_count + gt_count - overlap),
        "ravd": abs(gt_count - pred_count) / gt_count * 100.0,
        "assd": float((pred_to_gt.sum() + gt_to_pred.sum()) / (pred_to_gt.size + gt_to_pred.size)),
        "mssd": float(max(pred_to_gt.max(), gt_to_pred.max())),
    }


def score_volume(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    geometry_or_spacing: Geometry | Sequence[float],
    *,
    class_ids: Iterable[int] | None = None,
) -> dict[int, dict[str, float]]:
    """Scores a label map against ground truth, one binary comparison per class.

    Args:
      prediction, ground_truth: (slices, rows, cols) integer class-id maps, 0 = background.
      geometry_or_spacing: a Geometry, or (slice, row, col) spacing in mm.
      class_ids: the classes to score; default every nonzero id in either map.

    Returns:
      {class_id: binary_scores(...)} in ascending class id order.
    """
    prediction = np.asarray(prediction)
    ground_truth = np.asarray(ground_truth)
    if prediction.shape != ground_truth.shape:
        raise DataError(f"prediction shape {prediction.shape} differs from ground truth shape {ground_truth.shape}")
    geometry = as_geometry(geometry_or_spacing)
    if class_ids is None:
        class_ids = np.union1d(np.unique(prediction), np.unique(ground_truth))
        class_ids = [c for c in class_ids if c != 0]
    return {
        int(c): binary_scores(prediction == c, ground_truth == c, geometry) for c in sorted(int(c) for c in class_ids)
    }


# Where a class's false-positive voxels lie, as fractions of its true volume (see `volume_analysis`).
FALSE_POSITIVE_SITES = ("fp_off_slices", "fp_other_organs", "fp_boundary", "fp_elsewhere")
BOUNDARY_PIXELS = 2  # in-plane distance from the true organ that counts as its boundary


def volume_analysis(prediction: np.ndarray, ground_truth: np.ndarray, class_id: int) -> dict[str, float]:
    """Predicted / true volume of one class, and where its false positives are.

    Every false-positive voxel is counted once, in the first site that holds it: a slice with
    none of the class in the ground truth; another organ; within BOUNDARY_PIXELS in-plane of the
    class's true outline; elsewhere. All as fractions of the true volume, so
    volume_ratio = (true positives + the four sites) / true volume. A class absent from the
    ground truth gets nan (there is no volume to compare with).
    """
    prediction, ground_truth = np.asarray(prediction), np.asarray(ground_truth)
    truth = ground_truth == class_id
    true_volume = int(np.count_nonzero(truth))
    if true_volume == 0:
        return dict.fromkeys(("volume_ratio",) + FALSE_POSITIVE_SITES, math.nan)
    false_positive = (prediction == class_id) & ~truth
    off_slices = false_positive & ~truth.any(axis=(1, 2))[:, None, None]
    other_organs = false_positive & ~off_slices & (ground_truth != 0)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    near = ndimage.binary_dilation(truth, structure=in_plane, iterations=BOUNDARY_PIXELS)
    rest = false_positive & ~off_slices & ~other_organs
    counts = {
        "fp_off_slices": off_slices,
        "fp_other_organs": other_organs,
        "fp_boundary": rest & near,
        "fp_elsewhere": rest & ~near,
    }
    result = {"volume_ratio": np.count_nonzero(prediction == class_id) / true_volume}
    result.update({name: np.count_nonzero(mask) / true_volume for name, mask in counts.items()})
    return {name: float(value) for name, value in result.items()}


def chaos_score(metric_name: str, value: float) -> float:
    """The CHAOS challenge's 0..100 points for one metric value (non-finite values get 0)."""
    if metric_name not in CHAOS_SCORE_RANGES:
        raise ConfigError(f"no CHAOS score for metric {metric_name!r}; one of {sorted(CHAOS_SCORE_RANGES)}")
    if not math.isfinite(value):
        return 0.0
    perfect, threshold = CHAOS_SCORE_RANGES[metric_name]
    return float(np.clip((value - threshold) / (perfect - threshold), 0.0, 1.0) * 100.0)
