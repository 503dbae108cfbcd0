"""A DICOM series (one file per slice) -> float32 voxels and their patient geometry.

Slices stay in the order given (CHAOS: sorted file names, which the ground truth follows).
The slice step comes from ImagePositionPatient, not SliceThickness (they disagree in CHAOS CT).
Every file is untrusted: its header is checked against the limits below (and the decoded
size against `limits.MAX_DECODED_BYTES`) before any pixel data is decoded, and every pydicom
failure becomes a DataError naming the file. The files must form one series: one
SeriesInstanceUID and PatientID, one grid, and positions evenly spaced in the given order
(none missing, repeated or out of place), or a DataError names the file that breaks it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from scse_jax.data import limits
from scse_jax.data.types import Geometry
from scse_jax.errors import DataError

MAX_ROWS_COLS = 4096
MAX_SLICES = 4096
MAX_FILE_BYTES = 256 * 2**20
_ALLOWED_BITS = (8, 16, 32)
# How far a step between slices may stray from the usual (median) one, as a share of it: more
# means a missing, repeated or misplaced slice, and one slice step would put voxels at wrong mm.
SLICE_STEP_TOLERANCE = 0.01


@dataclasses.dataclass(frozen=True)
class SliceHeader:
    """What one slice's header says about its pixels and their place."""

    rows: int
    cols: int
    rescale_slope: float
    rescale_intercept: float
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient: (row direction, column direction)
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    slice_thickness: float | None
    series_uid: str
    patient_id: str


def series_files(folder: Path | str) -> list[Path]:
    """A folder's DICOM slices (*.dcm) in sorted-file-name order (the CHAOS convention)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: missing DICOM folder (empty case folder?)")
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm"), key=lambda p: p.name
    )
    if not files:
        raise DataError(f"{folder}: no DICOM files (*.dcm)")
    return files


def read_header(path: Path | str) -> pydicom.Dataset:
    """Reads a DICOM file's header only (no pixel data); DataError when it is not DICOM."""
    return _read(Path(path), stop_before_pixels=True)


def read_modality(path: Path | str) -> str:
    """The DICOM Modality of a series' file: "CT" or "MR"; DataError otherwise."""
    try:
        modality = str(read_header(path).get("Modality", "")).strip().upper()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: malformed DICOM header ({type(exc).__name__}: {exc})") from exc
    if modality not in ("CT", "MR"):
        raise DataError(f"{path}: Modality {modality!r} is neither CT nor MR")
    return modality


def read_series(files: Sequence[Path | str]) -> tuple[np.ndarray, Geometry]:
    """Reads slices, in the given order, as (slices, rows, cols) float32 and their Geometry.

    CT voxels are in Hounsfield units (stored * RescaleSlope + RescaleIntercept).
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise DataError("empty DICOM series: no files given")
    if len(paths) > MAX_SLICES:
        raise DataError(f"{paths[0].parent}: {len(paths)} slices exceed the limit of {MAX_SLICES}")
    headers: list[SliceHeader] = []
    voxels = np.empty(0, dtype=np.float32)
    for index, path in enumerate(paths):
        dataset = _read(path, stop_before_pixels=False)
        header = _parse_header(dataset, path)
        if index == 0:
            limits.check_decoded_size(path, (len(paths), header.rows, header.cols), np.float32, "DICOM series")
            voxels = np.empty((len(paths), header.rows, header.cols), dtype=np.float32)
        else:
            _check_same_series(header, headers[0], path, paths[0])
        voxels[index] = _decode_pixels(dataset, header, path)
        headers.append(header)
    return voxels, _series_geometry(headers, paths)


def _read(path: Path, *, stop_before_pixels: bool) -> pydicom.Dataset:
    limits.check_file_size(path, MAX_FILE_BYTES, "DICOM file", "DICOM file limit")
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=False)
    except Exception as exc:  # pydicom raises many types on malformed input; all mean "bad file".
        raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def _parse_header(dataset: pydicom.Dataset, path: Path) -> SliceHeader:
    try:
        return _header_fields(dataset, path)
    except DataError:
        raise
    except Exception as exc:  # a malformed element value surfaces only when it is accessed
        raise DataError(f"{path}: malformed DICOM header ({type(exc).__name__}: {exc})") from exc


def _header_fields(dataset: pydicom.Dataset, path: Path) -> SliceHeader:
    if "PixelData" not in dataset:
        raise DataError(f"{path}: DICOM file has no pixel data")
    rows, cols = _required(dataset, "Rows", path), _required(dataset, "Columns", path)
    rows, cols = int(rows), int(cols)
    if not (0 < rows <= MAX_ROWS_COLS and 0 < cols <= MAX_ROWS_COLS):
        raise DataError(f"{path}: {rows} x {cols} pixels outside the limit of 1..{MAX_ROWS_COLS} per side")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DataError(f"{path}: {frames} frames; only single-frame slices are supported")
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise DataError(f"{path}: {samples} samples per pixel; only grayscale images are supported")
    bits = int(_required(dataset, "BitsAllocated", path))
    if bits not in _ALLOWED_BITS:
        raise DataError(f"{path}: BitsAllocated {bits} not supported (expected one of {_ALLOWED_BITS})")
    position = _vector(dataset, "ImagePositionPatient", 3, path)
    orientation = _vector(dataset, "ImageOrientationPatient", 6, path).reshape(2, 3)
    norms = np.linalg.norm(orientation, axis=1)
    if not (np.allclose(norms, 1.0, atol=1e-2) and abs(orientation[0] @ orientation[1]) < 1e-2):
        raise DataError(f"{path}: ImageOrientationPatient {orientation.ravel().tolist()} is not two unit, orthogonal vectors")
    spacing = _vector(dataset, "PixelSpacing", 2, path)
    if not np.all(spacing > 0):
        raise DataError(f"{path}: PixelSpacing {spacing.tolist()} must be positive")
    thickness = dataset.get("SliceThickness")
    thickness = float(thickness) if thickness not in (None, "") and float(thickness) > 0 else None
    slope, intercept = _number(dataset, "RescaleSlope", 1.0), _number(dataset, "RescaleIntercept", 0.0)
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise DataError(f"{path}: RescaleSlope/RescaleIntercept must be finite")
    if slope == 0:
        raise DataError(f"{path}: RescaleSlope 0 would make every voxel {intercept:g}")
    return SliceHeader(
        rows, cols, slope, intercept, position, orientation, (float(spacing[0]), float(spacing[1])), thickness,
        series_uid=str(dataset.get("SeriesInstanceUID", "") or ""),
        patient_id=str(dataset.get("PatientID", "") or ""),
    )


def _number(dataset: pydicom.Dataset, keyword: str, default: float) -> float:
    value = dataset.get(keyword)
    return default if value is None or value == "" else float(value)


def _required(dataset: pydicom.Dataset, keyword: str, path: Path):
    value = dataset.get(keyword)
    if value is None or value == "":
        raise DataError(f"{path}: DICOM header lacks {keyword}")
    return value


def _vector(dataset: pydicom.Dataset, keyword: str, length: int, path: Path) -> np.ndarray:
    value = _required(dataset, keyword, path)
    items = value if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]
    values = np.array([float(v) for v in items])
    if values.shape != (length,) or not np.all(np.isfinite(values)):
        raise DataError(f"{path}: {keyword} must be {length} finite numbers, got {value!r}")
    return values


def _check_same_series(header: SliceHeader, first: SliceHeader, path: Path, first_path: Path) -> None:
    for name, value, first_value in (
        ("SeriesInstanceUID", header.series_uid, first.series_uid),
        ("PatientID", header.patient_id, first.patient_id),
    ):
        if value != first_value:
            raise DataError(
                f"{path}: {name} {value!r} differs from {first_value!r} of {first_path}: "
                "one folder must hold one series of one patient"
            )
    if (header.rows, header.cols) != (first.rows, first.cols):
        raise DataError(
            f"{path}: {header.rows} x {header.cols} pixels differs from {first.rows} x {first.cols} "
            f"of {first_path} in the same series"
        )
    if not np.allclose(header.orientation, first.orientation, atol=1e-3):
        raise DataError(f"{path}: ImageOrientationPatient differs from {first_path} in the same series")
    if not np.allclose(header.pixel_spacing, first.pixel_spacing, rtol=1e-4):
        raise DataError(f"{path}: PixelSpacing differs from {first_path} in the same series")


def _decode_pixels(dataset: pydicom.Dataset, header: SliceHeader, path: Path) -> np.ndarray:
    try:
        pixels = dataset.pixel_array
    except Exception as exc:  # truncated, compressed without a decoder, inconsistent header...
        raise DataError(f"{path}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    if pixels.shape != (header.rows, header.cols):
        raise DataError(f"{path}: decoded pixel array has shape {pixels.shape}, expected {(header.rows, header.cols)}")
    return pixels.astype(np.float32) * np.float32(header.rescale_slope) + np.float32(header.rescale_intercept)


def _series_geometry(headers: list[SliceHeader], paths: list[Path]) -> Geometry:
    first = headers[0]
    row_direction, column_direction = first.orientation  # along a row (+col index), down a column (+row index)
    row_spacing, column_spacing = first.pixel_spacing
    if len(headers) > 1:
        slice_vector = _even_slice_step(np.array([h.position for h in headers]), paths)
        slice_step = float(np.linalg.norm(slice_vector))
    else:
        slice_step = first.slice_thickness or 1.0
        slice_vector = np.cross(row_direction, column_direction) * slice_step
    affine = np.eye(4)
    affine[:3, 0] = slice_vector
    affine[:3, 1] = column_direction * row_spacing
    affine[:3, 2] = row_direction * column_spacing
    affine[:3, 3] = first.position
    return Geometry((slice_step, row_spacing, column_spacing), affine)


def _even_slice_step(positions: np.ndarray, paths: list[Path]) -> np.ndarray:
    """The mean step between consecutive slices; DataError naming a repeated position, or the
    file farthest from the usual (median) step if it is too far."""
    steps = np.diff(positions, axis=0)
    lengths = np.linalg.norm(steps, axis=1)
    for index in np.flatnonzero(lengths < 1e-6):
        raise DataError(f"{paths[index + 1]}: same ImagePositionPatient as {paths[index].name} (a repeated slice)")
    usual = np.median(steps, axis=0)
    deviations = np.linalg.norm(steps - usual, axis=1)
    worst = int(np.argmax(deviations))
    if deviations[worst] > SLICE_STEP_TOLERANCE * np.linalg.norm(usual):
        raise DataError(
            f"{paths[worst + 1]}: lies {lengths[worst]:.4g} mm from {paths[worst].name}, most slices "
            f"{np.linalg.norm(usual):.4g} mm apart (uneven ImagePositionPatient: a slice missing, out of order "
            "or from another series)"
        )
    return (positions[-1] - positions[0]) / (len(positions) - 1)
