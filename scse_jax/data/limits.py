"""The size limit every reader checks from a file's header, before decoding anything.

A small compressed file can declare a huge array (a decompression bomb), so what is limited
is what the array will take once decoded: its voxels times the bytes each takes in the type
the reader decodes it into. Per-slice limits (pixels per side, file sizes) stay with each reader.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scse_jax.errors import DataError

# One decoded volume (a DICOM series, a NIfTI image, a series of ground-truth PNGs).
MAX_DECODED_BYTES = 2 * 2**30


def check_decoded_size(source: Path | str, shape: Sequence[int], dtype, what: str = "volume") -> None:
    """DataError naming `source` when an array of `shape` and `dtype` exceeds MAX_DECODED_BYTES."""
    dtype = np.dtype(dtype)
    decoded = math.prod(int(n) for n in shape) * dtype.itemsize
    if decoded > MAX_DECODED_BYTES:
        dims = " x ".join(str(int(n)) for n in shape)
        raise DataError(
            f"{source}: a {dims} {what} of {dtype.name} decodes to {decoded} bytes, over the limit of "
            f"{MAX_DECODED_BYTES} bytes"
        )


def check_file_size(path: Path, limit: int, what: str, limit_name: str) -> None:
    """DataError naming `path` when it cannot be read (`what`: "DICOM file") or holds more than
    `limit` bytes (`limit_name`: "DICOM file limit")."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    if size > limit:
        raise DataError(f"{path}: {size} bytes exceeds the {limit_name} of {limit} bytes")
