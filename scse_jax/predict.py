"""Segments DICOM series with a trained model and writes CHAOS submission PNGs or NIfTI.

    python -m scse_jax.predict --checkpoint runs/mr_scse_cpu --input CHAOS_Test_Sets/Test_Sets \
        --output submission [--format png|nifti] [--which best|latest|STEP] [--tta] [--force]

``--input`` is one DICOM series folder, one case folder (``DICOM_anon/``) or a CHAOS tree.
PNG output is one 8-bit PNG per slice, named after its DICOM file, in the series' order, with
the CHAOS gray values (liver 63, right kidney 126, left kidney 189, spleen 252). For a CHAOS
tree each case goes to ``<output>/<modality>/<patient>/[<sequence>/]Results/``, mirroring the
data's own layout; T1-DUAL out-phase results go to ``T1DUAL/Results_OutPhase``. Existing
files are never overwritten without ``--force``, and ``--force`` replaces only what this
command wrote before: every results folder it writes holds a marker file (`RESULTS_MARKER`),
and a folder without one (the user's own, the input series) is never replaced or deleted.
Each volume is written into a temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scse_jax.errors import ScseError
from scse_jax.postprocess import add_largest_component_flag

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
# In every results folder this command writes: proof that --force may replace the folder.
RESULTS_MARKER = ".scse_jax_results"


def safe_name(name: str) -> str:
    """A single path component that cannot escape its folder."""
    cleaned = _SAFE.sub("_", str(name)).strip(".")
    return cleaned or "_"


def case_output_dir(output: Path, modality: str, patient: str, sequence: str) -> Path:
    parts = [safe_name(modality), safe_name(patient)]
    if sequence == "T2SPIR":
        parts += ["T2SPIR", "Results"]
    elif sequence == "T1DUAL_InPhase":
        parts += ["T1DUAL", "Results"]
    elif sequence == "T1DUAL_OutPhase":
        parts += ["T1DUAL", "Results_OutPhase"]
    else:
        parts += ["Results"]
    path = output.joinpath(*parts)
    if output.resolve() not in path.resolve().parents:
        raise ScseError(f"refusing to write outside {output}: {path}")
    return path


def write_png_series(labels: np.ndarray, names: list[str], folder: Path) -> None:
    from PIL import Image

    from scse_jax.data.labels import class_ids_to_gray

    gray = class_ids_to_gray(labels)
    for name, image in zip(names, gray):
        Image.fromarray(image.astype(np.uint8), mode="L").save(folder / f"{name}.png")


def nifti_affine(index_to_patient: np.ndarray) -> np.ndarray:
    """The RAS affine of an array stored (col, row, slice), from our (slice, row, col) -> LPS one."""
    reordered = index_to_patient[:, [2, 1, 0, 3]]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ reordered


def write_nifti(labels: np.ndarray, index_to_patient: np.ndarray, path: Path) -> None:
    try:
        import nibabel
    except ImportError as error:
        raise ScseError("NIfTI output needs nibabel: pip install 'scse_jax[nifti]'") from error
    volume = np.ascontiguousarray(np.transpose(labels, (2, 1, 0)).astype(np.uint8))
    image = nibabel.Nifti1Image(volume, nifti_affine(index_to_patient))
    image.header.set_xyzt_units("mm")
    nibabel.save(image, str(path))


def _jobs(input_path: Path, output: Path, modality: str, sequences: tuple[str, ...]):
    """(description, dicom files, destination folder) for every series to segment.

    In a CHAOS tree only the modality and sequences the model was trained on are segmented.
    """
    from scse_jax.data import chaos, dicom

    if input_path.is_dir() and any(input_path.glob("*.dcm")):
        return [(input_path.name, tuple(dicom.series_files(input_path)), output)]
    cases = [
        c
        for c in chaos.find_cases(input_path)
        if c.modality == modality and c.sequence in sequences and c.file_format == "dicom"
    ]
    if not cases:
        raise ScseError(
            f"no {modality} {'/'.join(sequences)} DICOM series under {input_path} (what the model was trained on)"
        )
    return [
        (f"{c.modality} {c.patient} {c.sequence}", c.image_files, case_output_dir(output, c.modality, c.patient, c.sequence))
        for c in cases
    ]


def _check_replaceable(folder: Path, *, nifti: bool, force: bool) -> None:
    """Refuses a folder holding files this command did not write, and results of its own
    without --force."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not (folder / RESULTS_MARKER).exists():
        raise ScseError(f"{folder} holds files this command did not write; choose another --output")
    target = folder / "segmentation.nii.gz" if nifti else folder
    if target.exists() and not force:
        raise ScseError(f"{target} exists; pass --force to overwrite it")


def run(args: argparse.Namespace) -> int:
    from scse_jax import cpu_layout
    from scse_jax import compilation
    from scse_jax.data import dicom
    from scse_jax.data.types import Volume
    from scse_jax.evaluate import config_on_this_machine
    from scse_jax.inference import Segmenter

    input_path, output = Path(args.input), Path(args.output)
    if not input_path.exists():
        raise ScseError(f"--input {input_path} does not exist")
    cpu_layout.set_up(args.cpu_devices)
    segmenter = Segmenter.from_checkpoint(args.checkpoint, which=args.which, largest_component=args.largest_component)
    compilation.use_compilation_cache(config_on_this_machine(segmenter.config).data)
    print(f"checkpoint {segmenter.chosen} of {args.checkpoint}", flush=True)
    jobs = _jobs(input_path, output, segmenter.config.data.modality, tuple(segmenter.config.data.sequences))
    for _, files, folder in jobs:
        _check_replaceable(folder, nifti=args.format == "nifti", force=args.force)
    output.mkdir(parents=True, exist_ok=True)
    for index, (description, files, folder) in enumerate(jobs, 1):
        start = time.perf_counter()
        voxels, geometry = dicom.read_series(files)
        labels = segmenter.segment_volume(Volume(voxels, geometry), tta=args.tta)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        try:
            if args.format == "png":
                write_png_series(labels, [Path(f).stem for f in files], staging)
                (staging / RESULTS_MARKER).touch()
                if folder.exists():  # checked above: empty, or results of ours
                    shutil.rmtree(folder) if (folder / RESULTS_MARKER).exists() else folder.rmdir()
                staging.rename(folder)
                where = folder
            else:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / RESULTS_MARKER).touch()
                write_nifti(labels, geometry.index_to_patient, staging / "segmentation.nii.gz")
                (staging / "segmentation.nii.gz").replace(folder / "segmentation.nii.gz")
                where = folder / "segmentation.nii.gz"
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        print(
            f"[{index}/{len(jobs)}] {description}: {len(files)} slices in {time.perf_counter() - start:.1f} s -> {where}",
            flush=True,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scse_jax.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run's workdir or its checkpoints folder")
    parser.add_argument("--input", required=True, help="a DICOM series folder, a case folder or a CHAOS tree")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--format", choices=("png", "nifti"), default="png")
    parser.add_argument(
        "--which",
        help="best (highest validation Dice), latest, or a step number (default: the run's eval.checkpoint, "
        "as `evaluate --checkpoint` scores)",
    )
    parser.add_argument("--tta", action="store_true", help="average over small shifts (test-time augmentation)")
    parser.add_argument("--force", action="store_true", help="overwrite existing results")
    parser.add_argument(
        "--cpu-devices", default="auto",
        help="JAX devices the CPU is split into: auto (one per physical core) or a count, 1 for a single device",
    )
    add_largest_component_flag(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ScseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
