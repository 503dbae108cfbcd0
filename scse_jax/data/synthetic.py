"""Synthetic CHAOS-format data: real DICOM files and Ground PNGs of abdominal phantoms.

Each patient is a random abdomen (body outline with subcutaneous fat, intra-abdominal fat and
bowel, aorta and vena cava, vertebra with spinal canal and back muscles, liver, spleen and two
kidneys) whose organs grow and shrink along z like ellipsoids, with irregular outlines and
sizes, positions and extents drawn per patient. Images are displayed radiologically: the
patient's right (liver, right kidney) is on the image's left, anterior at the top.
CT is stored as uint16 with RescaleIntercept -1024 (Hounsfield units); MR as uint16 signal with
a smooth bias field and Rician noise. The output is deterministic from the seed (byte-identical
files) and is written into a hidden temporary folder, then renamed into place.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

from scse_jax.data import labels
from scse_jax.errors import ConfigError, DataError

# Tissue codes of the phantom; organs map to class ids through _TISSUE_CLASS.
AIR, FAT, SOFT, LIVER, SPLEEN, R_KIDNEY, L_KIDNEY, R_MEDULLA, L_MEDULLA, BONE, MARROW, CSF, VESSEL, GAS, FLUID = range(15)
_NUM_TISSUES = 15
_TISSUE_CLASS = np.zeros(_NUM_TISSUES, dtype=np.uint8)
_TISSUE_CLASS[[LIVER, R_KIDNEY, R_MEDULLA, L_KIDNEY, L_MEDULLA, SPLEEN]] = [1, 2, 2, 3, 3, 4]

# Mean signal per tissue (indexed by tissue code): CT in HU, MR in arbitrary units.
_SIGNAL = {
    "CT": [-1000, -100, 40, 60, 50, 150, 150, 100, 100, 700, 250, 10, 180, -900, 15],
    "T2SPIR": [0, 110, 190, 250, 520, 600, 600, 700, 700, 40, 130, 1000, 60, 10, 850],
    "T1DUAL_InPhase": [0, 850, 320, 520, 380, 420, 420, 300, 300, 60, 600, 120, 200, 10, 150],
    "T1DUAL_OutPhase": [0, 800, 300, 470, 370, 400, 400, 290, 290, 60, 380, 120, 190, 10, 150],
}
_MR_SEQUENCES = {"T2SPIR": "T2SPIR", "T1DUAL": ("T1DUAL_InPhase", "T1DUAL_OutPhase")}
_FOV_MM = {"CT": 380.0, "MR": 400.0}
_Z_EXTENT_MM = {"CT": 210.0, "MR": 230.0}
_STUDY_DATE = "20190101"


@dataclasses.dataclass(frozen=True)
class _Organ:
    """An irregular ellipsoid: (u, v) centre at its widest slice, semi-axes, tilt, z extent."""

    tissue: int
    center: tuple[float, float]
    axes: tuple[float, float]
    angle: float
    z_center: float
    z_half: float
    drift: tuple[float, float]  # centre shift per unit of z, so organs move along z
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) of outline harmonics 2, 3, 4...


def write_synthetic_chaos(
    out_dir: Path | str,
    *,
    patients: int = 6,
    slices: int = 14,
    size: int = 128,
    seed: int = 0,
    modalities: Sequence[str] = ("CT", "MR"),
) -> Path:
    """Writes a CHAOS-format tree of phantoms under `out_dir` and returns it.

    `out_dir` must not exist or be empty; it appears complete or not at all.
    """
    out_dir = Path(out_dir)
    _check_arguments(patients, slices, size, modalities)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: exists and is not an empty folder; refusing to overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        for modality in modalities:
            for number in range(1, patients + 1):
                _write_patient(staging, modality, number, slices=slices, size=size, seed=seed)
        try:
            if out_dir.exists():
                out_dir.rmdir()
            staging.rename(out_dir)
        except OSError:
            # Several processes (e.g. the hosts of one run) may write the same tree at once:
            # the first complete one stays, the others are dropped.
            if not (out_dir.is_dir() and any(out_dir.iterdir())):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _check_arguments(patients: int, slices: int, size: int, modalities: Sequence[str]) -> None:
    if patients < 1:
        raise ConfigError(f"patients must be >= 1, got {patients}")
    if slices < 2:
        raise ConfigError(f"slices must be >= 2, got {slices}")
    if not 32 <= size <= 1024:
        raise ConfigError(f"size must lie in 32..1024, got {size}")
    unknown = [m for m in modalities if m not in ("CT", "MR")]
    if unknown or not modalities:
        raise ConfigError(f"modalities must be some of CT, MR; got {list(modalities)}")


# --------------------------------------------------------------------------- anatomy


def _random_anatomy(rng: np.random.Generator) -> dict:
    def jitter(value, spread):
        return value + rng.uniform(-spread, spread)

    def organ(tissue, center, axes, angle, z_center, z_half, harmonic_amplitude=0.06):
        scale = rng.uniform(0.85, 1.15)
        return _Organ(
            tissue=tissue,
            center=(jitter(center[0], 0.04), jitter(center[1], 0.04)),
            axes=(axes[0] * scale * rng.uniform(0.93, 1.07), axes[1] * scale * rng.uniform(0.93, 1.07)),
            angle=jitter(angle, 0.15),
            z_center=jitter(z_center, 0.06),
            z_half=z_half * rng.uniform(0.85, 1.15),
            drift=(rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15)),
            harmonics=tuple(
                (rng.uniform(0, harmonic_amplitude), rng.uniform(0, 2 * np.pi)) for _ in range(3)
            ),
        )

    bowel = [
        organ(
            rng.choice([GAS, FLUID, SOFT]),
            (rng.uniform(-0.45, 0.45), rng.uniform(-0.4, 0.15)),
            (rng.uniform(0.05, 0.11), rng.uniform(0.05, 0.11)),
            rng.uniform(0, np.pi),
            rng.uniform(0.3, 1.0),
            rng.uniform(0.08, 0.25),
            harmonic_amplitude=0.15,
        )
        for _ in range(int(rng.integers(5, 10)))
    ]
    return {
        "body_axes": (0.84 * rng.uniform(0.9, 1.05), 0.62 * rng.uniform(0.9, 1.05)),
        "fat_thickness": rng.uniform(0.05, 0.14),
        "stomach": organ(rng.choice([GAS, FLUID]), (0.28, -0.25), (0.2, 0.14), 0.3, 0.2, 0.22, 0.1),
        "bowel": bowel,
        "liver": organ(LIVER, (-0.36, -0.03), (0.36, 0.42), -0.3, 0.36, 0.4),
        "liver_left_lobe": organ(LIVER, (0.02, -0.27), (0.26, 0.13), 0.15, 0.22, 0.22),
        "spleen": organ(SPLEEN, (0.5, 0.13), (0.13, 0.24), 0.5, 0.32, 0.24),
        "right_kidney": organ(R_KIDNEY, (-0.27, 0.33), (0.115, 0.16), -0.35, 0.58, 0.26, 0.03),
        "left_kidney": organ(L_KIDNEY, (0.27, 0.31), (0.115, 0.16), 0.35, 0.52, 0.26, 0.03),
    }


def _organ_mask(organ: _Organ, t: float, u: np.ndarray, v: np.ndarray, shrink: float = 1.0) -> np.ndarray:
    mask = np.zeros(u.shape, dtype=bool)
    profile = 1.0 - ((t - organ.z_center) / organ.z_half) ** 2
    if profile <= 0.02:
        return mask
    scale = np.sqrt(profile) * shrink
    center_u = organ.center[0] + organ.drift[0] * (t - organ.z_center)
    center_v = organ.center[1] + organ.drift[1] * (t - organ.z_center)
    # Only the organ's bounding box is computed: most of the slice lies outside it.
    reach = max(organ.axes) * scale * (1.0 + sum(amp for amp, _ in organ.harmonics))
    cols = np.flatnonzero(np.abs(u[0] - center_u) <= reach)
    rows = np.flatnonzero(np.abs(v[:, 0] - center_v) <= reach)
    if cols.size == 0 or rows.size == 0:
        return mask
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    du, dv = u[box] - center_u, v[box] - center_v
    cos, sin = np.cos(organ.angle), np.sin(organ.angle)
    a = (cos * du + sin * dv) / (organ.axes[0] * scale)
    b = (-sin * du + cos * dv) / (organ.axes[1] * scale)
    radius = np.hypot(a, b)
    direction = (a + 1j * b) / np.maximum(radius, 1e-9)  # exp(i theta)
    outline = np.ones_like(radius)
    power = direction
    for amplitude, phase in organ.harmonics:  # harmonics 2, 3, 4 of the outline
        power = power * direction
        outline += amplitude * (power * np.exp(1j * phase)).real
    mask[box] = radius < outline
    return mask


def _tissue_slice(anatomy: dict, t: float, u: np.ndarray, v: np.ndarray, fat_field: np.ndarray) -> np.ndarray:
    """Tissue codes of the axial slice at normalised height t (0 = top of the liver dome)."""
    tissue = np.full(u.shape, AIR, dtype=np.uint8)
    body_a, body_b = anatomy["body_axes"]
    body = ((u / body_a) ** 2 + ((v - 0.05) / body_b) ** 2) < 1.0
    inner_scale = 1.0 - anatomy["fat_thickness"]
    inner = ((u / (body_a * inner_scale)) ** 2 + ((v - 0.05) / (body_b * inner_scale)) ** 2) < 1.0
    tissue[body] = FAT
    tissue[inner & (fat_field > -0.6)] = SOFT  # intra-abdominal fat where the field is low
    for organ in [anatomy["stomach"], *anatomy["bowel"]]:
        tissue[_organ_mask(organ, t, u, v) & inner] = organ.tissue
    for name in ("liver", "liver_left_lobe", "spleen", "right_kidney", "left_kidney"):
        organ = anatomy[name]
        mask = _organ_mask(organ, t, u, v) & inner
        tissue[mask] = organ.tissue
        if organ.tissue in (R_KIDNEY, L_KIDNEY):
            medulla = R_MEDULLA if organ.tissue == R_KIDNEY else L_MEDULLA
            tissue[_organ_mask(organ, t, u, v, shrink=0.5) & mask] = medulla
    disc = lambda cu, cv, r: (u - cu) ** 2 + (v - cv) ** 2 < r**2  # noqa: E731
    tissue[disc(0.06, 0.22, 0.045)] = VESSEL  # aorta
    tissue[((u + 0.1) / 0.06) ** 2 + ((v - 0.2) / 0.04) ** 2 < 1] = VESSEL  # inferior vena cava
    for side in (-1, 1):
        tissue[((u - side * 0.15) / 0.09) ** 2 + ((v - 0.52) / 0.07) ** 2 < 1] = SOFT  # back muscles
    tissue[disc(0.0, 0.38, 0.09)] = BONE
    tissue[disc(0.0, 0.38, 0.07)] = MARROW
    tissue[disc(0.0, 0.53, 0.035)] = CSF
    tissue[~body] = AIR
    return tissue


def _tissue_volume(anatomy: dict, rng: np.random.Generator, slices: int, size: int) -> np.ndarray:
    coords = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    v, u = np.meshgrid(coords, coords, indexing="ij")  # v: rows (anterior -> posterior), u: columns
    fat_field = ndimage.gaussian_filter(rng.standard_normal((slices, size, size)), (0.8, size / 20, size / 20))
    fat_field /= fat_field.std() + 1e-12
    heights = (np.arange(slices) + 0.5) / slices * 0.95 - 0.03
    return np.stack([_tissue_slice(anatomy, t, u, v, fat_field[i]) for i, t in enumerate(heights)])


# --------------------------------------------------------------------------- intensities


def _ct_intensities(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    signal = np.asarray(_SIGNAL["CT"], dtype=np.float64) * rng.uniform(0.9, 1.1, _NUM_TISSUES)
    signal[AIR] = -1000.0
    hu = signal[tissue]
    texture = ndimage.gaussian_filter(rng.standard_normal(tissue.shape), (0, 1.5, 1.5)) * 20.0
    hu += texture + rng.normal(0.0, 12.0, tissue.shape)
    return np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.uint16)


def _mr_intensities(tissue: np.ndarray, sequence: str, bias: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    signal = np.asarray(_SIGNAL[sequence], dtype=np.float64) * rng.uniform(0.9, 1.1, _NUM_TISSUES)
    image = signal[tissue]
    image += ndimage.gaussian_filter(rng.standard_normal(tissue.shape), (0, 1.5, 1.5)) * 0.05 * image
    if sequence == "T1DUAL_OutPhase":
        # Opposed-phase "India ink": signal cancels in voxels on fat/water boundaries.
        fat = tissue == FAT
        boundary = fat ^ ndimage.binary_erosion(fat, structure=np.ones((1, 3, 3), bool))
        boundary &= ndimage.binary_dilation(~fat & (tissue != AIR), structure=np.ones((1, 3, 3), bool))
        image[boundary] *= 0.25
    image *= bias
    sigma = 0.02 * float(signal.max())
    noisy = np.hypot(image + rng.normal(0.0, sigma, image.shape), rng.normal(0.0, sigma, image.shape))
    return np.clip(np.round(noisy), 0, 4095).astype(np.uint16)


def _bias_field(rng: np.random.Generator, slices: int, size: int) -> np.ndarray:
    coords = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    z = np.linspace(-1.0, 1.0, slices)[:, None, None]
    v, u = coords[None, :, None], coords[None, None, :]
    c = rng.uniform(-0.25, 0.25, 6)
    return np.exp(c[0] * u + c[1] * v + c[2] * u * v + c[3] * u**2 + c[4] * v**2 + c[5] * z)


# --------------------------------------------------------------------------- files


def _write_patient(root: Path, modality: str, number: int, *, slices: int, size: int, seed: int) -> None:
    rng = np.random.default_rng([seed, number, 0 if modality == "CT" else 1])
    anatomy = _random_anatomy(rng)
    tissue = _tissue_volume(anatomy, rng, slices, size)
    class_ids = _TISSUE_CLASS[tissue]
    pixel_mm = round(_FOV_MM[modality] * rng.uniform(0.9, 1.05) / size, 4)
    step_mm = round(_Z_EXTENT_MM[modality] / slices, 1)
    patient = str(number)
    if modality == "CT":
        case_dir = root / "CT" / patient
        series = _Series(seed, modality, patient, "CT", 4, pixel_mm, -step_mm, size)
        _write_dicoms(case_dir / "DICOM_anon", series, _ct_intensities(tissue, rng), _ct_name)
        _write_ground(case_dir / "Ground", class_ids == 1, lambda k: f"liver_GT_{k:03d}.png")
        return
    bias = _bias_field(rng, slices, size)
    t2 = _Series(seed, modality, patient, "T2SPIR", 2, pixel_mm, step_mm, size)
    _write_dicoms(root / "MR" / patient / "T2SPIR" / "DICOM_anon", t2, _mr_intensities(tissue, "T2SPIR", bias, rng), _mr_name(2, 1))
    _write_ground(root / "MR" / patient / "T2SPIR" / "Ground", labels.class_ids_to_gray(class_ids), _mr_png_name(2, 1))
    t1_dir = root / "MR" / patient / "T1DUAL"
    for phase, first_instance in (("InPhase", 2), ("OutPhase", 1)):
        series = _Series(seed, modality, patient, f"T1DUAL_{phase}", 4, pixel_mm, step_mm, size)
        pixels = _mr_intensities(tissue, f"T1DUAL_{phase}", bias, rng)
        _write_dicoms(t1_dir / "DICOM_anon" / phase, series, pixels, _mr_name(4, first_instance, stride=2))
    _write_ground(t1_dir / "Ground", labels.class_ids_to_gray(class_ids), _mr_png_name(4, 2, stride=2))


def _ct_name(k: int) -> str:
    return f"i{k:04d},0000b.dcm"


def _mr_name(series: int, first: int, stride: int = 1):
    return lambda k: f"IMG-{series:04d}-{first + stride * k:05d}.dcm"


def _mr_png_name(series: int, first: int, stride: int = 1):
    return lambda k: f"IMG-{series:04d}-{first + stride * k:05d}.png"


@dataclasses.dataclass(frozen=True)
class _Series:
    seed: int
    modality: str
    patient: str
    description: str
    number: int
    pixel_mm: float
    step_mm: float  # signed: CT runs head to feet (z decreasing), like the real CHAOS sample
    size: int

    def uid(self, *parts) -> str:
        return generate_uid(entropy_srcs=["scse_jax-synthetic", str(self.seed), self.modality, self.patient, *map(str, parts)])


def _ds(value: float) -> str:
    return f"{round(float(value), 4):.10g}"


def _write_dicoms(folder: Path, series: _Series, pixels: np.ndarray, name) -> None:
    folder.mkdir(parents=True)
    ds = _series_dataset(series, rows=pixels.shape[1], cols=pixels.shape[2])
    origin = _ds(-series.pixel_mm * series.size / 2)
    z0 = 1500.0 if series.step_mm < 0 else -100.0
    # One dataset, updated per slice: building a fresh one per file doubles the writing time.
    for k, image in enumerate(pixels):
        sop_uid = series.uid("image", series.description, k)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        z = _ds(z0 + series.step_mm * k)
        ds.ImagePositionPatient = [origin, origin, z]
        ds.SliceLocation = z
        ds.PixelData = np.ascontiguousarray(image, dtype="<u2").tobytes()
        ds.save_as(folder / name(k), enforce_file_format=True)


def _series_dataset(series: _Series, *, rows: int, cols: int) -> Dataset:
    sop_class = CTImageStorage if series.modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = series.uid("study")
    ds.SeriesInstanceUID = series.uid("series", series.description)
    ds.FrameOfReferenceUID = series.uid("frame")
    ds.StudyDate = ds.SeriesDate = _STUDY_DATE
    ds.Modality = series.modality
    ds.PatientID = f"SYNTH_{series.modality}_{series.patient}"
    ds.PatientName = f"SYNTHETIC^{series.modality}_{series.patient}"
    ds.SeriesDescription = series.description
    ds.SeriesNumber = series.number
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = _ds(abs(series.step_mm))
    ds.PixelSpacing = [_ds(series.pixel_mm), _ds(series.pixel_mm)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if series.modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "50", "400"
    else:
        ds.MagneticFieldStrength = "1.5"
        ds.EchoTime = {"T2SPIR": "70", "T1DUAL_InPhase": "4.6", "T1DUAL_OutPhase": "2.3"}[series.description]
    return ds


def _write_ground(folder: Path, masks: np.ndarray, name) -> None:
    folder.mkdir(parents=True)
    for k, mask in enumerate(masks):
        # CT ground truth is 1-bit like the real files; MR is 8-bit gray.
        Image.fromarray(mask).save(folder / name(k), format="PNG")
