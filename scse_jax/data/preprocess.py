"""Intensity normalisation, resizing to the training grid and an on-disk cache of prepared cases.

Normalisation (see `normalise`):
  CT: Hounsfield units clipped to `ct_window` (default -160..240 HU, an abdominal soft-tissue
      window of level 40, width 400) and scaled linearly to [0, 1].
  MR: per volume, clipped to the `mr_percentiles` (default 0.5th..99.5th) of its voxels, then
      z-scored (zero mean, unit standard deviation over the clipped volume).

Resizing (see `resize_slices`, `resize_labels`, `label_shares`, `resize_probabilities`) maps
pixel centres onto pixel centres: output pixel j of n_out samples the input at
(j + 0.5) * n_in / n_out - 0.5, bilinearly. Label maps are resized per class on that same grid,
so they stay on their images; predictions come back to the native grid as bilinearly resized
class probabilities. Non-square slices are stretched onto the square grid and stretched back the
same way.

The cache holds one compressed `.npz` (no pickled objects) per case and settings, named
`<case key>-<hash>.npz`, where the hash covers the source files (path, size, mtime) and the
settings. Entries are written atomically (temporary file in the same folder, fsync, rename),
read with `allow_pickle=False`, and checked (keys, shapes, dtypes, stored digest); a damaged
entry is rebuilt with a warning. Leftover `.tmp-*` files from killed writers are never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from scse_jax import files
from scse_jax.data.types import Case, Geometry, Volume
from scse_jax.errors import ConfigError, DataError, OutputError

log = logging.getLogger(__name__)

# Bump when the stored format or the meaning of the preprocessing changes.
CACHE_FORMAT_VERSION = 3
_TEMP_PREFIX = ".tmp-"
_MODALITIES = ("CT", "MR")

Loader = Callable[[Case], Volume]


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
    """How a case is brought onto the training grid.

    Attributes:
      image_size: side of the square training grid, in pixels.
      ct_window: (low, high) Hounsfield units; CT is clipped to it and scaled to [0, 1].
      mr_percentiles: (low, high) percentiles of each MR volume; it is clipped to them and
        z-scored.
    """

    image_size: int = 256
    ct_window: tuple[float, float] = (-160.0, 240.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ConfigError(f"image_size must be a positive integer, got {self.image_size!r}")
        low, high = self.ct_window
        if not low < high:
            raise ConfigError(f"ct_window must be (low, high) with low < high, got {self.ct_window}")
        low, high = self.mr_percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ConfigError(
                f"mr_percentiles must satisfy 0 <= low < high <= 100, got {self.mr_percentiles}"
            )

    def cache_key_dict(self) -> dict:
        """Everything that changes the prepared arrays, as JSON-ready values."""
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "image_size": int(self.image_size),
            "ct_window": [float(v) for v in self.ct_window],
            "mr_percentiles": [float(v) for v in self.mr_percentiles],
        }


@dataclasses.dataclass
class PreparedCase:
    """A case on the training grid, with what scoring needs on the native grid.

    Attributes:
      case_key: Case.key of the source case.
      patient: the patient id.
      images: (slices, S, S) float32, normalised, on the training grid.
      labels: (slices, S, S) uint8 class ids on the training grid, or None.
      native_labels: (slices, rows, cols) uint8 class ids on the native grid, or None.
      geometry: the native geometry.
      native_shape: (slices, rows, cols) of the native volume.
    """

    case_key: str
    patient: str
    images: np.ndarray
    labels: np.ndarray | None
    native_labels: np.ndarray | None
    geometry: Geometry
    native_shape: tuple[int, int, int]


def normalise(voxels: np.ndarray, modality: str, settings: PreprocessSettings) -> np.ndarray:
    """CT: window and scale to [0, 1]; MR: clip to percentiles and z-score. Returns float32."""
    voxels = np.asarray(voxels, dtype=np.float32)
    if modality == "CT":
        low, high = settings.ct_window
        return ((np.clip(voxels, low, high) - low) / (high - low)).astype(np.float32)
    if modality == "MR":
        low, high = np.percentile(voxels, settings.mr_percentiles)
        clipped = np.clip(voxels, low, high)
        std = clipped.std()
        if std <= 0:  # a constant volume carries no contrast to keep
            return np.zeros_like(voxels)
        return ((clipped - clipped.mean()) / std).astype(np.float32)
    raise ConfigError(f"modality must be one of {_MODALITIES}, got {modality!r}")


def _sample_positions(n_in: int, n_out: int) -> np.ndarray:
    """Pixel-centre-aligned source coordinates of n_out output pixels."""
    return (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5


def _linear_along(array: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    n_in = array.shape[axis]
    positions = np.clip(_sample_positions(n_in, n_out), 0.0, n_in - 1)
    lower = np.floor(positions).astype(np.int64)
    upper = np.minimum(lower + 1, n_in - 1)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = n_out
    weight = (positions - lower).reshape(weight_shape).astype(array.dtype)
    return np.take(array, lower, axis=axis) * (1 - weight) + np.take(array, upper, axis=axis) * weight


def _resize(array: np.ndarray, rows_cols: tuple[int, int]) -> np.ndarray:
    """Bilinear, pixel centres on pixel centres; (slices, rows, cols) -> (slices, *rows_cols) float32."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise DataError(f"expected (slices, rows, cols), got shape {array.shape}")
    rows, cols = (int(v) for v in rows_cols)
    if rows < 1 or cols < 1:
        raise ConfigError(f"target size must be positive, got {rows_cols}")
    out = array.astype(np.float32, copy=False)
    if out.shape[1] != rows:
        out = _linear_along(out, 1, rows)
    if out.shape[2] != cols:
        out = _linear_along(out, 2, cols)
    return np.ascontiguousarray(out, dtype=np.float32)


def resize_slices(array: np.ndarray, size: int) -> np.ndarray:
    """Resizes (slices, rows, cols) images to (slices, size, size) float32, bilinearly."""
    return _resize(array, (size, size))


def resize_labels(labels: np.ndarray, rows_cols: tuple[int, int]) -> np.ndarray:
    """Resizes (slices, rows, cols) class ids to (slices, *rows_cols), same dtype.

    Each class's indicator is resized bilinearly on the images' pixel-centre grid, as the images
    are, and every pixel takes the class with the largest value there: its share of the pixel
    when shrinking by up to 2x. Nearest neighbour cannot keep labels on their images at even
    factors: halving takes one of two equidistant pixels, which moves the labels half a native
    pixel against the bilinearly resized images.

    Ties (a pixel half on an organ, along every outline that halving splits) go to the higher
    class on a checkerboard of pixels and to the lower one on the others: giving them all to
    one side would grow or shrink every organ on the grid by a few per cent.
    """
    labels = np.asarray(labels)
    shares = label_shares(labels, rows_cols, int(labels.max(initial=0)) + 1)
    rows, cols = shares.shape[1:3]
    best_class = np.zeros((labels.shape[0], rows, cols), labels.dtype)
    checkerboard = (np.add.outer(np.arange(rows), np.arange(cols)) % 2 == 0)[None]
    best_share = None
    for class_id in np.unique(labels):  # ascending: a later class is the higher one
        share = shares[..., class_id]
        if best_share is None:
            best_share, best_class[:] = share, class_id
            continue
        wins = (share > best_share) | ((share == best_share) & checkerboard)
        best_share = np.where(wins, share, best_share)
        best_class[wins] = class_id
    return best_class


def label_shares(labels: np.ndarray, rows_cols: tuple[int, int], num_classes: int) -> np.ndarray:
    """Each class's share of every output pixel: (slices, rows, cols) class ids ->
    (slices, *rows_cols, num_classes) float32, summing to 1 per pixel.

    The class indicators resized bilinearly on the images' grid, as `resize_labels` resizes them
    before taking the largest: each class's area share of the pixel when shrinking by up to 2x.
    Training on them (``data.soft_labels``) keeps what that choice throws away along every outline.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise DataError(f"expected (slices, rows, cols), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"label values must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    return np.stack([_resize((labels == c).astype(np.float32), rows_cols) for c in range(num_classes)], -1)


def resize_probabilities(probabilities: np.ndarray, rows_cols: tuple[int, int]) -> np.ndarray:
    """Resizes (slices, rows, cols, classes) class probabilities bilinearly to
    (slices, *rows_cols, classes) float32; they still sum to 1 per pixel."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 4:
        raise DataError(f"expected (slices, rows, cols, classes), got shape {probabilities.shape}")
    return np.stack([_resize(probabilities[..., c], rows_cols) for c in range(probabilities.shape[-1])], -1)


def _source_files(case: Case) -> tuple[Path, ...]:
    return tuple(case.image_files) + tuple(case.label_files)


def cache_key(case: Case, settings: PreprocessSettings) -> str:
    """Hash of the case, its source files (path, size, mtime) and the settings."""
    files = []
    for path in _source_files(case):
        try:
            stat = os.stat(path)
        except OSError as error:
            raise DataError(f"cannot read source file {path}: {error}") from error
        files.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    description = {"case": case.key, "files": files, "settings": settings.cache_key_dict()}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def cache_path(case: Case, settings: PreprocessSettings, cache_dir: str | os.PathLike) -> Path:
    """Where the cache entry of this case and these settings lives."""
    return _entry_path(Path(cache_dir), case, cache_key(case, settings))


def _entry_path(cache_dir: Path, case: Case, key: str) -> Path:
    return cache_dir / f"{case.key}-{key[:24]}.npz"


def _check_cache_dir_outside_data(case: Case, cache_dir: Path) -> None:
    sources = [Path(p).resolve().parent for p in _source_files(case)]
    if not sources:
        return
    data_folder = Path(os.path.commonpath(sources))
    resolved = cache_dir.resolve()
    if resolved == data_folder or data_folder in resolved.parents:
        raise ConfigError(
            f"cache_dir {cache_dir} lies inside the data folder {data_folder}; "
            "the cache must never write into the data"
        )


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _to_arrays(prepared: PreparedCase, key: str) -> dict[str, np.ndarray]:
    arrays = {
        "images": prepared.images,
        "spacing_mm": np.asarray(prepared.geometry.spacing_mm, dtype=np.float64),
        "index_to_patient": np.asarray(prepared.geometry.index_to_patient, dtype=np.float64),
        "native_shape": np.asarray(prepared.native_shape, dtype=np.int64),
        "case_key": np.asarray(prepared.case_key),
        "patient": np.asarray(prepared.patient),
        "key": np.asarray(key),
    }
    if prepared.labels is not None:
        arrays["labels"] = prepared.labels
        arrays["native_labels"] = prepared.native_labels
    return arrays


def _from_arrays(arrays: dict[str, np.ndarray], key: str, size: int) -> PreparedCase:
    """Rebuilds a PreparedCase, checking every invariant; raises ValueError when one fails."""
    stored_digest = str(arrays.pop("digest"))
    if _digest(arrays) != stored_digest:
        raise ValueError("digest mismatch")
    if str(arrays["key"]) != key:
        raise ValueError("entry belongs to another key")
    native_shape = tuple(int(v) for v in arrays["native_shape"])
    images = arrays["images"]
    expected_images = (native_shape[0], size, size) if len(native_shape) == 3 else None
    if images.dtype != np.float32 or images.shape != expected_images:
        raise ValueError(f"images of shape {images.shape} do not fit native shape {native_shape}")
    labels = arrays.get("labels")
    native_labels = arrays.get("native_labels")
    if (labels is None) != (native_labels is None):
        raise ValueError("labels and native labels must both be present or both absent")
    if labels is not None and (
        labels.dtype != np.uint8
        or labels.shape != images.shape
        or native_labels.dtype != np.uint8
        or native_labels.shape != native_shape
    ):
        raise ValueError("label arrays have the wrong shape or type")
    geometry = Geometry(
        tuple(float(v) for v in arrays["spacing_mm"]), np.asarray(arrays["index_to_patient"])
    )
    return PreparedCase(
        case_key=str(arrays["case_key"]),
        patient=str(arrays["patient"]),
        images=images,
        labels=labels,
        native_labels=native_labels,
        geometry=geometry,
        native_shape=native_shape,
    )


def _read_entry(path: Path, key: str, size: int) -> PreparedCase:
    with np.load(path, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    return _from_arrays(arrays, key, size)


def _write_entry(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes atomically: a crash leaves either the old state or the complete new file."""
    arrays = dict(arrays, digest=np.asarray(_digest(arrays)))
    with files.atomic_write(path, "wb", prefix=_TEMP_PREFIX + path.stem + "-", suffix=".npz") as stream:
        np.savez_compressed(stream, **arrays)


def _default_loader() -> Loader:
    from scse_jax.data import chaos  # imported late: the readers are optional for cached runs

    return chaos.load_case


def _prepare_volume(case: Case, volume: Volume, settings: PreprocessSettings) -> PreparedCase:
    voxels = np.asarray(volume.voxels)
    first_file = case.image_files[0] if case.image_files else case.key
    if voxels.ndim != 3 or min(voxels.shape) < 1:
        raise DataError(f"{first_file}: expected a (slices, rows, cols) volume, got {voxels.shape}")
    if not np.all(np.isfinite(voxels)):
        raise DataError(f"{first_file}: the volume holds non-finite voxel values")
    size = settings.image_size
    images = resize_slices(normalise(voxels, case.modality, settings), size)
    labels = native_labels = None
    if volume.labels is not None:
        native_labels = np.asarray(volume.labels)
        if native_labels.shape != voxels.shape:
            raise DataError(
                f"{first_file}: labels of shape {native_labels.shape} do not match "
                f"voxels of shape {voxels.shape}"
            )
        native_labels = native_labels.astype(np.uint8)
        labels = resize_labels(native_labels, (size, size))
    return PreparedCase(
        case_key=case.key,
        patient=case.patient,
        images=images,
        labels=labels,
        native_labels=native_labels,
        geometry=volume.geometry,
        native_shape=tuple(int(v) for v in voxels.shape),
    )


def _prepare_with_status(
    case: Case, settings: PreprocessSettings, cache_dir, load: Loader | None
) -> tuple[PreparedCase, str]:
    load = load or _default_loader()
    if cache_dir is None:
        return _prepare_volume(case, load(case), settings), "prepared"
    cache_dir = Path(cache_dir)
    _check_cache_dir_outside_data(case, cache_dir)
    key = cache_key(case, settings)
    path = _entry_path(cache_dir, case, key)
    status = "prepared"
    if path.exists():
        try:
            return _read_entry(path, key, settings.image_size), "cached"
        except Exception as error:  # any damage at all means: rebuild
            log.warning(
                "cache entry %s is damaged (%s: %s); rebuilding it", path, type(error).__name__, error
            )
            status = "rebuilt"
    prepared = _prepare_volume(case, load(case), settings)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_entry(path, _to_arrays(prepared, key))
    except (OSError, OutputError) as error:
        raise DataError(f"cannot write cache entry {path}: {error}") from error
    return prepared, status


def prepare_case(
    case: Case,
    settings: PreprocessSettings,
    cache_dir: str | os.PathLike | None = None,
    *,
    load: Loader | None = None,
) -> PreparedCase:
    """Loads (or reads from the cache), normalises and resizes one case.

    Args:
      case: the case to prepare.
      settings: how to normalise and resize.
      cache_dir: folder of the on-disk cache, created if needed; None disables the cache.
        It must not lie inside the data folder.
      load: Case -> Volume; defaults to `scse_jax.data.chaos.load_case`.
    """
    return _prepare_with_status(case, settings, cache_dir, load)[0]


def prepare_cases(
    cases: Sequence[Case],
    settings: PreprocessSettings,
    cache_dir: str | os.PathLike | None = None,
    *,
    load: Loader | None = None,
    progress: bool = True,
) -> list[PreparedCase]:
    """`prepare_case` over many cases, with one progress line per case on stderr."""
    return list(iter_prepared_cases(cases, settings, cache_dir, load=load, progress=progress))


def iter_prepared_cases(
    cases: Sequence[Case],
    settings: PreprocessSettings,
    cache_dir: str | os.PathLike | None = None,
    *,
    load: Loader | None = None,
    progress: bool = True,
) -> Iterator[PreparedCase]:
    """`prepare_cases`, yielding each case as soon as it is ready."""
    for number, case in enumerate(cases, start=1):
        start = time.perf_counter()
        prepared, status = _prepare_with_status(case, settings, cache_dir, load)
        if progress:
            print(
                f"[{number}/{len(cases)}] {case.key}: {status} {prepared.native_shape} "
                f"in {time.perf_counter() - start:.2f} s",
                file=sys.stderr,
                flush=True,
            )
        yield prepared
