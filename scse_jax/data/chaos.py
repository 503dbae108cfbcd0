"""Finds CHAOS cases on disk and loads them as Volumes.

Recognised layouts (reading never writes anything):
  - a training tree (`CHAOS_Train_Sets/Train_Sets`, or any folder holding `CT/` and/or `MR/`):
    `CT/<id>/DICOM_anon/*.dcm` + `CT/<id>/Ground/*.png`,
    `MR/<id>/T2SPIR/DICOM_anon/*.dcm` + `T2SPIR/Ground/*.png`,
    `MR/<id>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm` sharing `T1DUAL/Ground/*.png`;
  - one MR patient folder holding `T2SPIR/` and/or `T1DUAL/`;
  - one case folder holding `DICOM_anon/` (and `Ground/`); the modality comes from the DICOM
    Modality tag, the patient id from the folder name (its parent's for T2SPIR/T1DUAL folders);
  - a CHAOST2 NIfTI folder of `image_<id>.nii.gz` (+ `label_<id>.nii.gz`).
Files are in sorted-file-name order; images and Ground PNGs pair one to one in that order.
A missing Ground folder means a case without ground truth (a test set).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from scse_jax.data import dicom, labels, nifti
from scse_jax.data.types import SEQUENCES, Case, Volume, patient_order
from scse_jax.errors import ConfigError, DataError

_T1_PHASES = (("InPhase", "T1DUAL_InPhase"), ("OutPhase", "T1DUAL_OutPhase"))


def find_cases(path: Path | str, *, sequences: Iterable[str] | None = None) -> list[Case]:
    """Lists the cases under `path`, patients in numeric order, optionally only `sequences`."""
    path = Path(path)
    wanted = _check_sequences(sequences)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder (expected a CHAOS tree, case folder or NIfTI folder)")
    cases = _find_any(path)
    return [case for case in cases if wanted is None or case.sequence in wanted]


def num_slices(case: Case) -> int:
    """How many slices `load_case` will return, from the file list or the NIfTI header only."""
    if case.file_format == "nifti":
        return nifti.num_slices(case.image_files[0])
    return len(case.image_files)


def check_headers(case: Case) -> None:
    """Checks what a case's NIfTI headers promise (shape, data type, affine, decoded size)
    without decoding voxels, so that a run refuses a bad file before training. DICOM slices are
    checked as they are read (a series is only known whole)."""
    if case.file_format == "nifti":
        for path in case.image_files + case.label_files:
            nifti.check_header(path)


def load_case(case: Case, *, with_labels: bool = True) -> Volume:
    """Reads a case's voxels, geometry and (if asked and present) its label map."""
    if case.file_format == "nifti":
        return nifti.load_case(case, with_labels=with_labels)
    if case.file_format != "dicom":
        raise DataError(f"{case.key}: unknown file format {case.file_format!r}")
    voxels, geometry = dicom.read_series(case.image_files)
    label_map = None
    if with_labels and case.label_files:
        label_map = load_labels(case)
        if label_map.shape[1:] != voxels.shape[1:]:
            raise DataError(
                f"{case.label_files[0]}: ground truth is {label_map.shape[2]} x {label_map.shape[1]} "
                f"but {case.image_files[0]} is {voxels.shape[2]} x {voxels.shape[1]}"
            )
    return Volume(voxels, geometry, label_map)


def load_labels(case: Case) -> np.ndarray:
    """The label map `load_case` returns, without decoding the images (the Ground PNGs, or the
    NIfTI label file)."""
    if case.file_format == "nifti":
        return nifti.load_labels(case)
    if not case.label_files:
        raise DataError(f"{case.key}: no Ground PNGs")
    _check_counts(case.image_files, case.label_files, case.key)
    return labels.read_ground(case.label_files, case.modality)


def _check_sequences(sequences: Iterable[str] | None) -> frozenset[str] | None:
    if sequences is None:
        return None
    wanted = frozenset(sequences)
    unknown = sorted(wanted - set(SEQUENCES))
    if unknown:
        raise ConfigError(f"sequences: unknown {unknown} (expected some of {list(SEQUENCES)})")
    return wanted


def _find_any(path: Path) -> list[Case]:
    for nested in ("CHAOS_Train_Sets", "Train_Sets"):
        if (path / nested).is_dir() and not _is_tree(path):
            return _find_any(path / nested)
    if _is_tree(path):
        cases = _find_tree(path)
        if not cases:
            raise DataError(f"{path}: CHAOS tree without any case folders")
        return cases
    if (path / "DICOM_anon").is_dir():
        return _find_case_folder(path)
    if (path / "T2SPIR").is_dir() or (path / "T1DUAL").is_dir():
        return _mr_patient(path, path.name)
    if nifti.has_nifti_images(path):
        return nifti.find_cases(path)
    raise DataError(
        f"{path}: not a CHAOS folder (expected CT/ or MR/, DICOM_anon/ with Ground/, "
        "or image_<id>.nii.gz files)"
    )


def _is_tree(path: Path) -> bool:
    return (path / "CT").is_dir() or (path / "MR").is_dir()


def _find_tree(root: Path) -> list[Case]:
    cases = []
    if (root / "CT").is_dir():
        for patient_dir in _patient_dirs(root / "CT"):
            cases.append(_dicom_case(patient_dir, patient_dir.name, "CT", "CT"))
    if (root / "MR").is_dir():
        for patient_dir in _patient_dirs(root / "MR"):
            cases.extend(_mr_patient(patient_dir, patient_dir.name))
    return cases


def _patient_dirs(folder: Path) -> list[Path]:
    dirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(dirs, key=lambda p: patient_order(p.name))


def _mr_patient(patient_dir: Path, patient: str) -> list[Case]:
    cases = []
    if (patient_dir / "T2SPIR").is_dir():
        cases.append(_dicom_case(patient_dir / "T2SPIR", patient, "MR", "T2SPIR"))
    if (patient_dir / "T1DUAL").is_dir():
        cases.extend(_t1dual_cases(patient_dir / "T1DUAL", patient))
    if not cases:
        raise DataError(f"{patient_dir}: empty MR case folder (expected T2SPIR/ and/or T1DUAL/)")
    return cases


def _t1dual_cases(t1_dir: Path, patient: str) -> list[Case]:
    dicom_dir = t1_dir / "DICOM_anon"
    ground = _ground_files(t1_dir)
    cases = []
    for folder, sequence in _T1_PHASES:
        if (dicom_dir / folder).is_dir():
            images = dicom.series_files(dicom_dir / folder)
            cases.append(_paired_case(patient, "MR", sequence, images, ground, t1_dir))
    if not cases:
        raise DataError(f"{dicom_dir}: empty T1DUAL case folder (expected InPhase/ and/or OutPhase/)")
    return cases


def _find_case_folder(case_dir: Path) -> list[Case]:
    phases = [d for d, _ in _T1_PHASES if (case_dir / "DICOM_anon" / d).is_dir()]
    patient = case_dir.parent.name if case_dir.name in ("T2SPIR", "T1DUAL") else case_dir.name
    if phases:
        return _t1dual_cases(case_dir, patient)
    images = dicom.series_files(case_dir / "DICOM_anon")
    modality = dicom.read_modality(images[0])
    sequence = "CT" if modality == "CT" else "T2SPIR"
    return [_paired_case(patient, modality, sequence, images, _ground_files(case_dir), case_dir)]


def _dicom_case(case_dir: Path, patient: str, modality: str, sequence: str) -> Case:
    images = dicom.series_files(case_dir / "DICOM_anon")
    return _paired_case(patient, modality, sequence, images, _ground_files(case_dir), case_dir)


def _paired_case(patient, modality, sequence, images, ground, case_dir: Path) -> Case:
    if ground is not None:
        _check_counts(images, ground, str(case_dir))
    return Case(patient, modality, sequence, tuple(images), tuple(ground or ()), "dicom")


def _ground_files(case_dir: Path) -> list[Path] | None:
    """The Ground PNGs, or None when there is no Ground folder (no ground truth)."""
    folder = case_dir / "Ground"
    if not folder.is_dir():
        return None
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png"), key=lambda p: p.name
    )


def _check_counts(images, ground, where: str) -> None:
    if len(images) == len(ground):
        return
    if len(ground) > len(images):
        unpaired = f"extra Ground PNG {ground[len(images)]}"
    else:
        unpaired = f"no Ground PNG for {images[len(ground)]}"
    raise DataError(f"{where}: {len(images)} DICOM files but {len(ground)} Ground PNGs; {unpaired}")


def label_voxels(volume: Volume, class_names: tuple[str, ...]) -> dict[str, int] | None:
    """Voxel count per class name, or None when the volume has no labels."""
    if volume.labels is None:
        return None
    counts = np.bincount(volume.labels.ravel(), minlength=len(class_names))
    return {name: int(counts[i]) for i, name in enumerate(class_names)}
