"""CHAOS ground-truth PNGs <-> class ids.

CT ground truth marks the liver with any nonzero value (the real files are 1-bit). MR ground
truth codes the four organs as gray values: liver 63 (55-70), right kidney 126 (110-135),
left kidney 189 (175-200), spleen 252 (240-255); anything else is an error, and so is a
1-bit PNG (it cannot hold those values: its white would read as spleen).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from scse_jax.data import limits
from scse_jax.errors import DataError

# A ground-truth PNG may not ask for more pixels than this (checked before decoding).
MAX_PNG_PIXELS = 4096 * 4096
MAX_PNG_FILE_BYTES = 64 * 2**20

# Class id -> the gray value CHAOS uses for it in MR ground truth (the middle of each range).
CHAOS_GRAY = {1: 63, 2: 126, 3: 189, 4: 252}
MR_GRAY_RANGES = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))

_UNKNOWN = 255
_MR_LOOKUP = np.full(256, _UNKNOWN, dtype=np.uint8)
_MR_LOOKUP[0] = 0
for _low, _high, _class_id in MR_GRAY_RANGES:
    _MR_LOOKUP[_low : _high + 1] = _class_id

_GRAY_MODES = ("L", "I", "I;16", "I;16B", "I;16L")


def read_png_gray(path: Path | str) -> np.ndarray:
    """Reads a PNG as a 2-D integer array of gray values (1-bit becomes 0/255; colour becomes L)."""
    return _read_png(Path(path))[0]


def _read_png(path: Path) -> tuple[np.ndarray, str]:
    """The gray values and the PNG's own Pillow mode ("1" for 1-bit)."""
    limits.check_file_size(path, MAX_PNG_FILE_BYTES, "ground-truth PNG", "PNG file limit")
    try:
        with Image.open(path, formats=["PNG"]) as image:
            width, height = image.size
            if width * height > MAX_PNG_PIXELS:
                raise DataError(
                    f"{path}: {width} x {height} pixels exceeds the PNG limit of {MAX_PNG_PIXELS} pixels"
                )
            mode = image.mode
            if image.mode not in _GRAY_MODES:
                image = image.convert("L")
            gray = np.array(image)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused as a decompression bomb ({exc})") from exc
    except Exception as exc:  # Pillow raises many types on malformed input; all mean "bad file".
        raise DataError(f"{path}: not a readable PNG ({type(exc).__name__}: {exc})") from exc
    if gray.ndim != 2:
        raise DataError(f"{path}: expected a single-channel image, got shape {gray.shape}")
    return gray, mode


def gray_to_class_ids(gray: np.ndarray, modality: str, *, source: Path | str = "<array>") -> np.ndarray:
    """Maps ground-truth gray values to uint8 class ids; `source` names the file in errors."""
    if modality == "CT":
        return (gray != 0).astype(np.uint8)
    if modality != "MR":
        raise DataError(f"{source}: unknown modality {modality!r} (expected 'CT' or 'MR')")
    too_large = gray > 255
    if too_large.any():
        raise DataError(f"{source}: unknown gray value {int(gray[too_large][0])} in MR ground truth")
    ids = _MR_LOOKUP[gray.astype(np.intp)]
    unknown = ids == _UNKNOWN
    if unknown.any():
        values = np.unique(gray[unknown])
        shown = ", ".join(str(int(v)) for v in values[:5])
        raise DataError(
            f"{source}: unknown gray value {shown} in MR ground truth "
            "(expected 0, 55-70, 110-135, 175-200 or 240-255)"
        )
    return ids


def png_to_class_ids(path: Path | str, modality: str) -> np.ndarray:
    """Reads one ground-truth PNG as a (rows, cols) uint8 array of class ids."""
    gray, mode = _read_png(Path(path))
    if mode == "1" and modality == "MR":
        raise DataError(
            f"{path}: a 1-bit PNG cannot hold MR ground truth (gray values liver 63, right kidney 126, "
            "left kidney 189, spleen 252); is it a CT liver mask?"
        )
    return gray_to_class_ids(gray, modality, source=path)


def read_ground(files: Sequence[Path | str], modality: str) -> np.ndarray:
    """Reads a Ground folder's PNGs (in the given order) as (slices, rows, cols) uint8 class ids."""
    if not files:
        raise DataError("no ground-truth PNG files given")
    first = png_to_class_ids(files[0], modality)
    limits.check_decoded_size(files[0], (len(files),) + first.shape, np.uint8, "ground-truth series")
    labels = np.empty((len(files),) + first.shape, dtype=np.uint8)
    labels[0] = first
    for index, path in enumerate(files[1:], start=1):
        ids = png_to_class_ids(path, modality)
        if ids.shape != first.shape:
            raise DataError(
                f"{path}: size {ids.shape[1]} x {ids.shape[0]} differs from "
                f"{first.shape[1]} x {first.shape[0]} of {files[0]}"
            )
        labels[index] = ids
    return labels


def class_ids_to_gray(ids: np.ndarray) -> np.ndarray:
    """Maps class ids 0..4 to the CHAOS MR gray values (0, 63, 126, 189, 252) as uint8."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > max(CHAOS_GRAY)):
        raise DataError(f"class ids must lie in 0..{max(CHAOS_GRAY)}, got {ids.min()}..{ids.max()}")
    lookup = np.zeros(max(CHAOS_GRAY) + 1, dtype=np.uint8)
    for class_id, gray in CHAOS_GRAY.items():
        lookup[class_id] = gray
    return lookup[ids.astype(np.intp)]
