"""The data records shared by readers, preprocessing, training, scoring and export.

Readers produce them; nothing here knows about file formats or JAX.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

# Class ids used everywhere; 0 is background. CT tasks only use liver.
CLASS_NAMES = ("background", "liver", "right_kidney", "left_kidney", "spleen")
SEQUENCES = ("CT", "T2SPIR", "T1DUAL_InPhase", "T1DUAL_OutPhase")


def patient_order(patient: str) -> tuple:
    """Sort key of patient ids: numeric ids in numeric order ("2" before "10"), others after."""
    return (0, int(patient), patient) if patient.isdigit() else (1, 0, patient)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where voxels of a (slices, rows, cols) array lie in patient space.

    Attributes:
      spacing_mm: (slice step, row spacing, column spacing), all positive, in mm.
      index_to_patient: 4x4 affine; patient (x, y, z, 1) in DICOM LPS mm equals
        index_to_patient @ (slice, row, col, 1).
    """

    spacing_mm: tuple[float, float, float]
    index_to_patient: np.ndarray

    @classmethod
    def from_spacing(cls, spacing_mm) -> "Geometry":
        """An axis-aligned geometry with the given spacing and the origin at zero."""
        spacing = tuple(float(s) for s in spacing_mm)
        affine = np.eye(4)
        # (slice, row, col) -> (x, y, z): col runs along x, row along y, slice along z.
        affine[:3, :3] = np.array([[0, 0, spacing[2]], [0, spacing[1], 0], [spacing[0], 0, 0]])
        return cls(spacing, affine)

    def to_patient_mm(self, indices: np.ndarray) -> np.ndarray:
        """Maps (N, 3) voxel indices (slice, row, col) to (N, 3) patient coordinates in mm."""
        indices = np.asarray(indices, dtype=np.float64)
        return indices @ self.index_to_patient[:3, :3].T + self.index_to_patient[:3, 3]


@dataclasses.dataclass(frozen=True)
class Case:
    """One image series of one patient, with its ground truth where there is one.

    Attributes:
      patient: the patient id as the data names it (a string, e.g. "1" or "21").
      modality: "CT" or "MR".
      sequence: one of SEQUENCES.
      image_files: DICOM slices in sorted-file-name order, or one NIfTI file.
      label_files: Ground PNGs in sorted-file-name order, or one NIfTI file; empty when the
        case has no ground truth (a test set).
      file_format: "dicom" or "nifti".
    """

    patient: str
    modality: str
    sequence: str
    image_files: tuple[Path, ...]
    label_files: tuple[Path, ...]
    file_format: str

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names of this case's task, background first."""
        return CLASS_NAMES[:2] if self.modality == "CT" else CLASS_NAMES

    @property
    def key(self) -> str:
        """A unique, file-name-safe name for the case, e.g. "MR_21_T2SPIR"."""
        return f"{self.modality}_{self.patient}_{self.sequence}"


@dataclasses.dataclass
class Volume:
    """A 3-D image and, where known, its label map, on the native grid.

    Attributes:
      voxels: (slices, rows, cols) float32; CT in Hounsfield units.
      geometry: voxel placement in patient space.
      labels: (slices, rows, cols) uint8 class ids, or None.
    """

    voxels: np.ndarray
    geometry: Geometry
    labels: np.ndarray | None = None
