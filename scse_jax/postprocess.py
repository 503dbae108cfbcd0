"""From a prediction on the training grid to the native-grid label map that is scored and written.

Validation, ``evaluate --checkpoint``, ``predict`` and ``Segmenter`` all go through
`to_native`, so a post-processing choice (``eval.largest_component``) means the same
everywhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from scse_jax.data.preprocess import resize_probabilities

# Slices resized at a time: the native-grid probabilities of a whole CT volume would be large.
_SLICES_PER_RESIZE = 16


def keep_largest_components(labels: np.ndarray, class_ids: Iterable[int]) -> np.ndarray:
    """Keeps, per class, only its largest 3-D connected component (face connectivity).

    Each organ is one connected body: islands elsewhere are false positives, which CHAOS
    entrants and nnU-Net remove the same way. Removed voxels become background (0).

    Args:
      labels: (slices, rows, cols) class ids.
      class_ids: the classes to clean; others are left as they are.
    """
    labels = np.asarray(labels)
    cleaned = labels.copy()
    for class_id in class_ids:
        components, count = ndimage.label(labels == class_id)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        cleaned[(components != 0) & (components != int(np.argmax(sizes)))] = 0
    return cleaned


def to_native(
    grid_probabilities: np.ndarray, native_rows_cols: tuple[int, int], *, largest_component: bool
) -> np.ndarray:
    """Class probabilities (slices, S, S, classes) on the training grid -> class ids
    (slices, rows, cols) uint8 on the native grid: the probabilities resized bilinearly
    (`preprocess.resize_probabilities`), then the most probable class, each organ reduced to
    its largest connected component when ``largest_component``.

    Resizing probabilities rather than class ids gives smooth outlines at the native
    resolution instead of the training grid's staircase."""
    grid_probabilities = np.asarray(grid_probabilities)
    if grid_probabilities.ndim != 4:
        raise ValueError(f"expected (slices, S, S, classes) probabilities, got shape {grid_probabilities.shape}")
    native = np.empty((len(grid_probabilities), *(int(v) for v in native_rows_cols)), np.uint8)
    for start in range(0, len(grid_probabilities), _SLICES_PER_RESIZE):
        chunk = grid_probabilities[start : start + _SLICES_PER_RESIZE]
        native[start : start + len(chunk)] = resize_probabilities(chunk, native_rows_cols).argmax(-1)
    return postprocessed(native, num_classes=grid_probabilities.shape[-1], largest_component=largest_component)


def postprocessed(native_labels: np.ndarray, *, num_classes: int, largest_component: bool) -> np.ndarray:
    """Native-grid class ids after the post-processing choice: each organ reduced to its
    largest connected component when ``largest_component``, else as they are."""
    return keep_largest_components(native_labels, range(1, num_classes)) if largest_component else native_labels


def add_largest_component_flag(parser: argparse.ArgumentParser) -> None:
    """--largest-component / --no-largest-component for the commands that write or score results."""
    parser.add_argument(
        "--largest-component",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep each organ's largest connected component (default: as the run's eval.largest_component)",
    )
