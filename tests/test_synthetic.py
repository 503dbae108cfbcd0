"""Synthetic CHAOS-format phantoms: real files, the CHAOS layout, plausible anatomy, determinism."""

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from scse_jax.data import chaos, synthetic
from scse_jax.data.synthetic import write_synthetic_chaos
from scse_jax.errors import ConfigError, DataError

SIZE, SLICES, PATIENTS = 48, 10, 2


@pytest.fixture(scope="module")
def synth_tree(tmp_path_factory) -> Path:
    return write_synthetic_chaos(
        tmp_path_factory.mktemp("synth") / "tree", patients=PATIENTS, slices=SLICES, size=SIZE, seed=3
    )


@pytest.fixture(scope="module")
def volumes(synth_tree):
    return {case.key: (case, chaos.load_case(case)) for case in chaos.find_cases(synth_tree)}


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_file_names(synth_tree, volumes):
    assert sorted(volumes) == sorted(
        f"{m}_{p}_{s}"
        for p in (1, 2)
        for m, s in [("CT", "CT"), ("MR", "T2SPIR"), ("MR", "T1DUAL_InPhase"), ("MR", "T1DUAL_OutPhase")]
    )
    ct = volumes["CT_1_CT"][0]
    assert [p.name for p in ct.image_files[:2]] == ["i0000,0000b.dcm", "i0001,0000b.dcm"]
    assert [p.name for p in ct.label_files[:2]] == ["liver_GT_000.png", "liver_GT_001.png"]
    t2 = volumes["MR_1_T2SPIR"][0]
    assert [p.name for p in t2.image_files[:2]] == ["IMG-0002-00001.dcm", "IMG-0002-00002.dcm"]
    assert [p.name for p in t2.label_files[:2]] == ["IMG-0002-00001.png", "IMG-0002-00002.png"]
    assert (synth_tree / "MR" / "1" / "T1DUAL" / "DICOM_anon" / "InPhase").is_dir()
    assert not any(p.name.startswith(".") for p in synth_tree.parent.iterdir())  # no staging left


def test_dicom_headers_are_real_and_plausible(volumes):
    case = volumes["CT_1_CT"][0]
    first = pydicom.dcmread(case.image_files[0])
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (first.Modality, first.RescaleIntercept, first.RescaleSlope) == ("CT", -1024, 1)
    assert list(first.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
    second = pydicom.dcmread(case.image_files[1])
    step = float(second.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
    assert step == pytest.approx(-float(first.SliceThickness))
    mr = pydicom.dcmread(volumes["MR_1_T1DUAL_OutPhase"][0].image_files[0])
    assert (mr.Modality, mr.SeriesDescription, mr.pixel_array.dtype) == ("MR", "T1DUAL_OutPhase", np.uint16)


def test_ct_hounsfield_units_per_tissue(volumes):
    _, volume = volumes["CT_1_CT"]
    hu = volume.voxels
    liver = hu[volume.labels == 1]
    assert 30 < np.median(liver) < 90
    assert np.median(hu[:, :2, :2]) == pytest.approx(-1000, abs=60)  # air in the corners
    assert hu.max() > 500  # bone
    assert np.any((hu > -160) & (hu < -40))  # fat


def test_anatomy(volumes):
    for key, (case, volume) in volumes.items():
        present = set(np.unique(volume.labels))
        assert present == set(range(len(case.class_names))), key
        column = {k: np.nonzero(volume.labels == k)[2].mean() for k in present - {0}}
        assert column[1] < SIZE / 2, key  # liver on the image's left (the patient's right)
        if case.modality == "MR":
            assert column[4] > SIZE / 2 and column[2] < SIZE / 2 < column[3], key
        # Organs appear and vanish along z.
        per_slice = [(volume.labels[s] == 1).sum() for s in range(SLICES)]
        assert min(per_slice) < max(per_slice) / 4, key
    kidney_slices = np.nonzero((volumes["MR_1_T2SPIR"][1].labels == 2).any(axis=(1, 2)))[0]
    assert 0 < len(kidney_slices) < SLICES


def test_patients_and_sequences_differ(volumes):
    assert not np.array_equal(volumes["CT_1_CT"][1].labels, volumes["CT_2_CT"][1].labels)
    in_phase, out_phase = volumes["MR_1_T1DUAL_InPhase"][1], volumes["MR_1_T1DUAL_OutPhase"][1]
    np.testing.assert_array_equal(in_phase.labels, out_phase.labels)  # one shared Ground folder
    assert not np.array_equal(in_phase.voxels, out_phase.voxels)
    t2 = volumes["MR_1_T2SPIR"][1]
    liver, spleen = t2.labels == 1, t2.labels == 4
    assert np.median(t2.voxels[spleen]) > np.median(t2.voxels[liver])  # T2: spleen brighter than liver
    in_liver, in_spleen = np.median(in_phase.voxels[liver]), np.median(in_phase.voxels[spleen])
    assert in_liver > in_spleen  # T1: the other way round


def test_same_seed_same_bytes_other_seed_other_pixels(tmp_path):
    kwargs = dict(patients=1, slices=3, size=32, modalities=("MR",))
    first = file_bytes(write_synthetic_chaos(tmp_path / "a", seed=7, **kwargs))
    assert first == file_bytes(write_synthetic_chaos(tmp_path / "b", seed=7, **kwargs))
    other = file_bytes(write_synthetic_chaos(tmp_path / "c", seed=8, **kwargs))
    assert first.keys() == other.keys()
    name = "MR/1/T2SPIR/DICOM_anon/IMG-0002-00002.dcm"
    assert pydicom.dcmread(tmp_path / "a" / name).PixelData != pydicom.dcmread(tmp_path / "c" / name).PixelData


def test_atomic_write_and_refusals(tmp_path, monkeypatch):
    out = tmp_path / "tree"
    calls = []

    def failing_ground(folder, masks, name):
        calls.append(folder)
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "_write_ground", failing_ground)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_chaos(out, patients=1, slices=2, size=32, modalities=("CT",))
    assert calls and not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_synthetic_chaos(out, patients=1, slices=2, size=32)
    assert (out / "precious.txt").read_text() == "keep me"
    for bad in (dict(patients=0), dict(size=8), dict(slices=1), dict(modalities=("PET",))):
        with pytest.raises(ConfigError):
            write_synthetic_chaos(tmp_path / "other", **bad)


def test_a_concurrent_writer_keeps_the_first_complete_tree(tmp_path, monkeypatch):
    out = tmp_path / "tree"
    write_patient = synthetic._write_patient

    def racing(root, *args, **kwargs):
        write_patient(root, *args, **kwargs)
        if not out.exists():
            shutil.copytree(root, out)  # another process finishes first

    monkeypatch.setattr(synthetic, "_write_patient", racing)
    assert write_synthetic_chaos(out, patients=1, slices=2, size=32, modalities=("CT",)) == out
    assert [c.key for c in chaos.find_cases(out)] == ["CT_1_CT"]
    assert list(tmp_path.iterdir()) == [out]  # the loser's staging folder is gone


def test_synthetic_mr_ground_truth_uses_the_chaos_gray_values(tmp_path):
    from scse_jax.data import labels
    from scse_jax.data.synthetic import write_synthetic_chaos

    root = write_synthetic_chaos(tmp_path / "tree", patients=1, slices=4, size=32)
    pngs = sorted((root / "MR").glob("*/T2SPIR/Ground/*.png"))
    grays = np.unique(np.concatenate([labels.read_png_gray(p).ravel() for p in pngs]))
    assert set(grays.tolist()) <= {0, *labels.CHAOS_GRAY.values()} and len(grays) > 1
