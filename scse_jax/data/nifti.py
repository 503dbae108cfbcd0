"""CHAOST2-style NIfTI pairs: image_<id>.nii.gz (+ label_<id>.nii.gz) -> Volume.

Layout convention, the same as an axial DICOM series with ImageOrientationPatient [1,0,0,0,1,0]:
the NIfTI array is first reoriented so its axes run towards patient Left, Posterior, Superior
(nibabel orientation tools; for CHAOST2, whose axis codes are L,A,S, this flips the second
axis), then transposed to (slices, rows, cols) = (third, second, first) NIfTI axis. So rows run
anterior -> posterior and columns patient right -> left (the liver is on the image's left).
Geometry.index_to_patient is the reoriented NIfTI affine converted from RAS to DICOM LPS.
The header is checked before any voxel is decoded: a 3-D shape with no empty axis, numbers
(not RGB or complex values), an affine that places voxels in 3-D (not singular), and the
decoded size (`limits.MAX_DECODED_BYTES`, counted in the type nibabel decodes into).
nibabel is imported only here and only when needed (pip install 'scse_jax[nifti]').
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scse_jax.data import limits
from scse_jax.data.types import CLASS_NAMES, Case, Geometry, Volume, patient_order
from scse_jax.errors import DataError

MAX_FILE_BYTES = 1024 * 2**20
# An affine whose 3 x 3 part is this ill-conditioned maps the voxels onto a plane or a line.
_MAX_AFFINE_CONDITION = 1e8
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# (slice, row, col, 1) -> (i, j, k, 1) of the reoriented NIfTI array.
_INDEX_TO_NIFTI = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def _nibabel():
    try:
        import nibabel
    except ImportError as exc:
        raise DataError("reading NIfTI files needs nibabel: pip install 'scse_jax[nifti]'") from exc
    return nibabel


def patient_id(path: Path) -> str:
    """The id in image_<id>.nii.gz / label_<id>.nii(.gz)."""
    name = path.name.removesuffix(".gz").removesuffix(".nii")
    return name.split("_", 1)[1]


def find_cases(folder: Path) -> list[Case]:
    """Lists image_<id>.nii(.gz) files in a folder, each with its label_<id> file if present."""
    images = {patient_id(p): p for p in _nifti_files(folder, "image_")}
    labels = {patient_id(p): p for p in _nifti_files(folder, "label_")}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DataError(f"{labels[orphans[0]]}: label without a matching image_{orphans[0]} file")
    cases = []
    for pid in sorted(images, key=patient_order):
        label_files = (labels[pid],) if pid in labels else ()
        cases.append(Case(pid, "MR", "T2SPIR", (images[pid],), label_files, "nifti"))
    return cases


def has_nifti_images(folder: Path) -> bool:
    """Whether the folder holds image_<id>.nii(.gz) files."""
    return bool(_nifti_files(folder, "image_"))


def load_case(case: Case, *, with_labels: bool = True) -> Volume:
    """Reads a NIfTI case: voxels (slices, rows, cols) float32, geometry, labels uint8 0..4."""
    image_path = case.image_files[0]
    image = _load(image_path)
    voxels, geometry, transform = _to_volume_layout(image, image_path)
    labels = None
    if with_labels and case.label_files:
        labels = _case_labels(case, image, transform)
    return Volume(voxels, geometry, labels)


def load_labels(case: Case) -> np.ndarray:
    """The label map `load_case` returns, without reading the image's voxels."""
    if not case.label_files:
        raise DataError(f"{case.key}: no label file")
    image = _load(case.image_files[0])
    return _case_labels(case, image, _to_lps_transform(image))


def _case_labels(case: Case, image, transform) -> np.ndarray:
    image_path, label_path = case.image_files[0], case.label_files[0]
    label = _load(label_path)
    if label.shape != image.shape:
        raise DataError(f"{label_path}: shape {label.shape} differs from {image.shape} of {image_path}")
    if not np.allclose(label.affine, image.affine, atol=1e-3):
        raise DataError(f"{label_path}: affine differs from that of {image_path}")
    return _label_ids(_reoriented(label, transform, label_path), label_path, len(case.class_names))


def read_image(path: Path | str) -> tuple[np.ndarray, Geometry]:
    """Reads one NIfTI image as (slices, rows, cols) float32 voxels and their Geometry."""
    path = Path(path)
    voxels, geometry, _ = _to_volume_layout(_load(path), path)
    return voxels, geometry


def _nifti_files(folder: Path, prefix: str) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.name.startswith(prefix) and p.name.endswith((".nii", ".nii.gz"))
    )


def _load(path: Path):
    nibabel = _nibabel()
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise DataError(f"{path}: {size} bytes exceeds the NIfTI file limit of {MAX_FILE_BYTES} bytes")
        image = nibabel.load(path)
        shape = tuple(int(n) for n in image.shape)
    except DataError:
        raise
    except Exception as exc:  # nibabel raises many types on malformed input
        raise DataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or 0 in shape:
        raise DataError(f"{path}: expected a 3-D volume with voxels along every axis, got shape {image.shape}")
    stored = image.get_data_dtype()
    if stored.kind not in "buif":
        kind = image.header.get_value_label("datatype")
        raise DataError(f"{path}: NIfTI data type {kind} is not one gray value per voxel")
    limits.check_decoded_size(path, shape, _decoded_dtype(image, stored), "NIfTI volume")
    linear = np.asarray(image.affine, dtype=np.float64)[:3, :3]
    if not np.all(np.isfinite(linear)) or np.linalg.cond(linear) > _MAX_AFFINE_CONDITION:
        raise DataError(
            f"{path}: the affine {linear.tolist()} is singular or not finite: it does not place the voxels in 3-D"
        )
    return image


def _decoded_dtype(image, stored: np.dtype) -> np.dtype:
    """What nibabel decodes into (scaled values become floats), and at least the float32 returned."""
    scaled = image.header.get_slope_inter() not in ((None, None), (1.0, 0.0))
    decoded = np.promote_types(stored, np.float32) if scaled else stored
    return max(decoded, np.dtype(np.float32), key=lambda dtype: dtype.itemsize)


def _data(image, path: Path) -> np.ndarray:
    try:
        data = np.asarray(image.dataobj)
    except Exception as exc:
        raise DataError(f"{path}: cannot read NIfTI voxel data ({type(exc).__name__}: {exc})") from exc
    return data.reshape(data.shape[:3])


def check_header(path: Path | str) -> None:
    """Checks a NIfTI file's header (see the module docstring) without decoding its voxels."""
    _load(Path(path))


def num_slices(path: Path | str) -> int:
    """Slices of the volume `read_image` returns, read from the header alone."""
    path = Path(path)
    image = _load(path)
    transform = _to_lps_transform(image)
    placeholder = np.broadcast_to(np.float32(0), image.shape[:3])  # no voxel data is read
    return int(_nibabel().orientations.apply_orientation(placeholder, transform).shape[2])


def _to_lps_transform(image):
    orientations = _nibabel().orientations
    return orientations.ornt_transform(
        orientations.io_orientation(image.affine), orientations.axcodes2ornt(("L", "P", "S"))
    )


def _to_volume_layout(image, path: Path):
    nibabel = _nibabel()
    orientations = nibabel.orientations
    shape = image.shape[:3]
    transform = _to_lps_transform(image)
    affine = image.affine @ orientations.inv_ornt_aff(transform, shape)
    voxels = _reoriented(image, transform, path).astype(np.float32)
    index_to_patient = _RAS_TO_LPS @ affine @ _INDEX_TO_NIFTI
    spacing = tuple(float(s) for s in np.linalg.norm(index_to_patient[:3, :3], axis=0))
    return voxels, Geometry(spacing, index_to_patient), transform


def _reoriented(image, transform, path: Path) -> np.ndarray:
    nibabel = _nibabel()
    data = nibabel.orientations.apply_orientation(_data(image, path), transform)
    return np.ascontiguousarray(data.transpose(2, 1, 0))


def _label_ids(data: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise DataError(f"{path}: label values must be whole numbers")
    bad = (data < 0) | (data >= num_classes)
    if bad.any():
        raise DataError(
            f"{path}: unknown label value {data[bad].flat[0]:g} "
            f"(expected 0..{num_classes - 1}: {', '.join(CLASS_NAMES[:num_classes])})"
        )
    return data.astype(np.uint8)
