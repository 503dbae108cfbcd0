"""CHAOS readers: real CT/MR samples, synthetic trees, pairing rules, bad input, limits, fuzzing."""

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from scse_jax.data import chaos, dicom, labels, limits, nifti
from scse_jax.data.synthetic import write_synthetic_chaos
from scse_jax.errors import ConfigError, DataError

SIZE, SLICES = 32, 4


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    """A written-once tiny CHAOS tree (1 CT and 1 MR patient); copy it before changing it."""
    return write_synthetic_chaos(tmp_path_factory.mktemp("tiny") / "tree", patients=1, slices=SLICES, size=SIZE)


@pytest.fixture
def tree(tiny_tree, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_tree, tmp_path / "tree"))


def ct_dir(root: Path) -> Path:
    return root / "CT" / "1"


def ct_files(root: Path) -> tuple[list[Path], list[Path]]:
    case = ct_dir(root)
    return sorted((case / "DICOM_anon").iterdir()), sorted((case / "Ground").iterdir())


def rewrite_dicom(path: Path, **changes) -> None:
    dataset = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    dataset.save_as(path)


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def ct_sample(ct_sample_dir):
    cases = chaos.find_cases(ct_sample_dir)
    return cases, chaos.load_case(cases[0])


def test_ct_sample_geometry_and_hounsfield_units(ct_sample, ct_sample_dir):
    cases, volume = ct_sample
    assert [(c.modality, c.sequence, len(c.image_files), len(c.label_files)) for c in cases] == [("CT", "CT", 78, 78)]
    assert volume.voxels.shape == (78, 512, 512) and volume.voxels.dtype == np.float32
    assert volume.geometry.spacing_mm == pytest.approx((2.0, 0.7265625, 0.7265625))
    # Slices run towards -z (1690.5 -> 1536.5), columns along +x, rows along +y.
    np.testing.assert_allclose(volume.geometry.index_to_patient[:3, 0], [0, 0, -2.0])
    np.testing.assert_allclose(volume.geometry.to_patient_mm([[77, 0, 0]]), [[-185.0, -98.0, 1536.5]])
    np.testing.assert_allclose(volume.geometry.to_patient_mm([[0, 2, 3]]), [[-185.0 + 3 * 0.7265625, -98.0 + 2 * 0.7265625, 1690.5]])
    stored = pydicom.dcmread(ct_sample_dir / "DICOM_anon" / "i0040,0000b.dcm").pixel_array
    assert volume.voxels[40, 300, 200] == float(stored[300, 200]) - 1000.0
    assert volume.voxels[40].min() == float(stored.min()) - 1000.0


def test_ct_sample_liver_voxels_match_the_pngs(ct_sample, ct_sample_dir):
    _, volume = ct_sample
    by_hand = sum(
        int(np.count_nonzero(np.asarray(Image.open(p)))) for p in sorted((ct_sample_dir / "Ground").glob("*.png"))
    )
    assert by_hand > 0
    assert set(np.unique(volume.labels)) == {0, 1}
    assert int(volume.labels.sum()) == by_hand
    # Pairing is by sorted file name: slice 40's labels are liver_GT_040.png.
    np.testing.assert_array_equal(volume.labels[40], np.asarray(Image.open(ct_sample_dir / "Ground" / "liver_GT_040.png")) > 0)


def test_mr_t2_folder(mr_t2_dir):
    import nibabel

    cases = chaos.find_cases(mr_t2_dir)
    assert len(cases) == 15
    assert [int(c.patient) for c in cases] == sorted(int(c.patient) for c in cases)
    assert {(c.modality, c.sequence, c.file_format) for c in cases} == {("MR", "T2SPIR", "nifti")}
    case = cases[0]
    volume = chaos.load_case(case)
    raw = nibabel.load(case.image_files[0])
    slices = raw.shape[2]
    assert volume.voxels.shape == (slices, 256, 256)
    assert volume.geometry.spacing_mm == pytest.approx((7.7, 1.25, 1.25), rel=1e-6)
    assert set(np.unique(volume.labels)) == {0, 1, 2, 3, 4}
    # Voxel (s, r, c) is NIfTI (i=c, j=255-r, k=s) (axis codes L,A,S; rows flipped to run A->P),
    # and both place it at the same point (RAS -> LPS).
    s, r, c = 10, 100, 60
    assert volume.voxels[s, r, c] == np.float32(np.asarray(raw.dataobj)[c, 255 - r, s])
    ras = raw.affine @ [c, 255 - r, s, 1]
    np.testing.assert_allclose(volume.geometry.to_patient_mm([[s, r, c]])[0], [-ras[0], -ras[1], ras[2]], atol=1e-4)
    # Radiological display: liver and right kidney on the image's left, spleen on its right.
    column = {k: np.nonzero(volume.labels == k)[2].mean() for k in (1, 2, 3, 4)}
    assert column[1] < 128 < column[4] and column[2] < 128 < column[3]


# --------------------------------------------------------------------------- layouts


def test_synthetic_tree_layouts(tree, tmp_path):
    cases = chaos.find_cases(tree)
    assert [c.key for c in cases] == ["CT_1_CT", "MR_1_T2SPIR", "MR_1_T1DUAL_InPhase", "MR_1_T1DUAL_OutPhase"]
    assert list(cases[0].image_files) == dicom.series_files(ct_dir(tree) / "DICOM_anon")
    in_phase, out_phase = cases[2], cases[3]
    assert in_phase.label_files == out_phase.label_files and in_phase.image_files != out_phase.image_files
    assert [c.key for c in chaos.find_cases(tree, sequences=["T2SPIR"])] == ["MR_1_T2SPIR"]
    with pytest.raises(ConfigError, match="T3"):
        chaos.find_cases(tree, sequences=["T3"])
    # The same cases through the nested CHAOS_Train_Sets/Train_Sets names and single folders.
    nested = tmp_path / "CHAOS_Train_Sets" / "Train_Sets"
    shutil.copytree(tree, nested)
    assert [c.key for c in chaos.find_cases(tmp_path / "CHAOS_Train_Sets")] == [c.key for c in cases]
    assert [c.key for c in chaos.find_cases(tree / "MR" / "1")] == [c.key for c in cases[1:]]
    assert [c.key for c in chaos.find_cases(tree / "MR" / "1" / "T2SPIR")] == ["MR_1_T2SPIR"]
    assert [c.key for c in chaos.find_cases(tree / "MR" / "1" / "T1DUAL")] == [c.key for c in cases[2:]]
    assert [(c.key, c.modality) for c in chaos.find_cases(ct_dir(tree))] == [("CT_1_CT", "CT")]


def test_numeric_patient_order(tiny_tree, tmp_path):
    for patient in ("10", "2", "1"):
        shutil.copytree(ct_dir(tiny_tree), tmp_path / "CT" / patient)
    assert [c.patient for c in chaos.find_cases(tmp_path)] == ["1", "2", "10"]


def test_test_set_without_ground(tree):
    shutil.rmtree(ct_dir(tree) / "Ground")
    (case,) = chaos.find_cases(tree, sequences=["CT"])
    assert case.label_files == ()
    assert chaos.load_case(case).labels is None


def test_reading_never_writes(tree):
    before = {p: p.stat().st_mtime_ns for p in tree.rglob("*")}
    for case in chaos.find_cases(tree):
        chaos.load_case(case)
    assert {p: p.stat().st_mtime_ns for p in tree.rglob("*")} == before


# --------------------------------------------------------------------------- pairing errors


def test_missing_png(tree):
    dicoms, pngs = ct_files(tree)
    pngs[-1].unlink()
    with pytest.raises(DataError, match=f"no Ground PNG for .*{dicoms[-1].name}"):
        chaos.find_cases(tree)


def test_extra_png(tree):
    _, pngs = ct_files(tree)
    extra = pngs[0].with_name("liver_GT_999.png")
    shutil.copy(pngs[0], extra)
    with pytest.raises(DataError, match="extra Ground PNG .*liver_GT_999.png"):
        chaos.find_cases(tree)


def test_png_of_wrong_size(tree):
    _, pngs = ct_files(tree)
    Image.new("L", (SIZE // 2, SIZE)).save(pngs[1])
    with pytest.raises(DataError, match=pngs[1].name):
        chaos.load_case(chaos.find_cases(tree)[0])


def test_all_pngs_of_another_size_than_the_images(tree):
    _, pngs = ct_files(tree)
    for png in pngs:
        Image.new("L", (SIZE * 2, SIZE * 2)).save(png)
    with pytest.raises(DataError, match="ground truth is 64 x 64 but .*i0000,0000b.dcm is 32 x 32"):
        chaos.load_case(chaos.find_cases(tree)[0])


def test_unknown_mr_gray_value(tree):
    png = sorted((tree / "MR" / "1" / "T2SPIR" / "Ground").iterdir())[2]
    gray = np.asarray(Image.open(png)).copy()
    gray[5, 5] = 90
    Image.fromarray(gray).save(png)
    case = chaos.find_cases(tree, sequences=["T2SPIR"])[0]
    with pytest.raises(DataError, match=f"{png.name}.*unknown gray value 90"):
        chaos.load_case(case)
    assert chaos.load_case(case, with_labels=False).labels is None


def test_a_one_bit_png_is_refused_as_mr_ground_truth(tree):
    """Its white (255) would read as spleen everywhere the mask is set."""
    png = sorted((tree / "MR" / "1" / "T2SPIR" / "Ground").iterdir())[2]
    mask = np.asarray(Image.open(png)) > 0
    Image.fromarray(mask).save(png)  # mode "1"
    case = chaos.find_cases(tree, sequences=["T2SPIR"])[0]
    with pytest.raises(DataError, match=f"{png.name}: a 1-bit PNG cannot hold MR ground truth"):
        chaos.load_labels(case)
    np.testing.assert_array_equal(labels.png_to_class_ids(png, "CT"), mask)  # a CT liver mask is 1-bit


def test_gray_ranges_and_export_round_trip(tmp_path):
    gray = np.array([[0, 55, 70, 110], [135, 175, 200, 240], [255, 63, 126, 189]], dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "mr.png")
    ids = labels.png_to_class_ids(tmp_path / "mr.png", "MR")
    np.testing.assert_array_equal(ids, [[0, 1, 1, 2], [2, 3, 3, 4], [4, 1, 2, 3]])
    np.testing.assert_array_equal(labels.gray_to_class_ids(labels.class_ids_to_gray(ids), "MR"), ids)
    # CT: 1-bit, 8-bit and colour PNGs; any nonzero pixel is liver.
    mask = np.zeros((4, 5), bool)
    mask[1:3, 2:4] = True
    Image.fromarray(mask).save(tmp_path / "ct1.png")
    Image.fromarray(mask.astype(np.uint8) * 37).convert("RGB").save(tmp_path / "ct_rgb.png")
    for name in ("ct1.png", "ct_rgb.png"):
        np.testing.assert_array_equal(labels.png_to_class_ids(tmp_path / name, "CT"), mask.astype(np.uint8))


# --------------------------------------------------------------------------- bad DICOM


def test_truncated_dicom(tree):
    dicoms, _ = ct_files(tree)
    data = dicoms[2].read_bytes()
    dicoms[2].write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=dicoms[2].name):
        dicom.read_series(dicoms)


def test_non_dicom_file(tree):
    dicoms, _ = ct_files(tree)
    dicoms[1].write_text("this is not DICOM\n")
    with pytest.raises(DataError, match=f"{dicoms[1].name}: not a readable DICOM file"):
        dicom.read_series(dicoms)


def test_dicom_without_pixel_data(tree):
    dicoms, _ = ct_files(tree)
    rewrite_dicom(dicoms[3], PixelData=None)
    with pytest.raises(DataError, match=f"{dicoms[3].name}: DICOM file has no pixel data"):
        dicom.read_series(dicoms)


def test_mixed_sizes_in_one_series(tree):
    dicoms, _ = ct_files(tree)
    rewrite_dicom(dicoms[1], Rows=16, Columns=16, PixelData=np.zeros((16, 16), np.uint16).tobytes())
    with pytest.raises(DataError, match=f"{dicoms[1].name}: 16 x 16 pixels differs from 32 x 32"):
        dicom.read_series(dicoms)


def test_missing_geometry_tag(tree):
    dicoms, _ = ct_files(tree)
    rewrite_dicom(dicoms[0], PixelSpacing=None)
    with pytest.raises(DataError, match=f"{dicoms[0].name}: DICOM header lacks PixelSpacing"):
        dicom.read_series(dicoms)


def test_slice_step_from_positions_and_single_slice_fallback(tree):
    dicoms, _ = ct_files(tree)
    header = pydicom.dcmread(dicoms[0])
    step = float(header.SliceThickness)
    _, geometry = dicom.read_series(dicoms)
    assert geometry.spacing_mm[0] == pytest.approx(step)
    np.testing.assert_allclose(geometry.index_to_patient[:3, 0], [0, 0, -step])  # synthetic CT runs head to feet
    rewrite_dicom(dicoms[0], SliceThickness="9.5")
    assert dicom.read_series(dicoms)[1].spacing_mm[0] == pytest.approx(step)  # positions win
    assert dicom.read_series(dicoms[:1])[1].spacing_mm[0] == pytest.approx(9.5)
    rewrite_dicom(dicoms[1], ImagePositionPatient=header.ImagePositionPatient)
    with pytest.raises(DataError, match="same ImagePositionPatient"):
        dicom.read_series(dicoms[:2])


@pytest.mark.parametrize("keyword", ["SeriesInstanceUID", "PatientID"])
def test_a_folder_of_two_series_or_two_patients_is_refused(tree, keyword):
    dicoms, _ = ct_files(tree)
    rewrite_dicom(dicoms[2], **{keyword: "1.2.3.4"})
    with pytest.raises(DataError, match=f"{dicoms[2].name}: {keyword} '1.2.3.4' differs from .* of .*{dicoms[0].name}"):
        dicom.read_series(dicoms)


def test_repeated_swapped_or_missing_slices_are_refused(tree):
    dicoms, _ = ct_files(tree)
    positions = [pydicom.dcmread(path).ImagePositionPatient for path in dicoms]
    step = float(positions[1][2]) - float(positions[0][2])
    rewrite_dicom(dicoms[3], ImagePositionPatient=[*positions[3][:2], float(positions[3][2]) + step])
    with pytest.raises(DataError, match=rf"{dicoms[3].name}: lies {2 * abs(step):g} mm from {dicoms[2].name}, most "
                                        rf"slices {abs(step):g} mm apart \(uneven ImagePositionPatient"):
        dicom.read_series(dicoms)  # a slice missing before the last
    rewrite_dicom(dicoms[3], ImagePositionPatient=positions[3])
    rewrite_dicom(dicoms[1], ImagePositionPatient=positions[2])
    rewrite_dicom(dicoms[2], ImagePositionPatient=positions[1])
    with pytest.raises(DataError, match="uneven ImagePositionPatient"):
        dicom.read_series(dicoms)  # two slices swapped
    rewrite_dicom(dicoms[2], ImagePositionPatient=positions[2])
    with pytest.raises(DataError, match=f"{dicoms[2].name}: same ImagePositionPatient as {dicoms[1].name}"):
        dicom.read_series(dicoms)  # a slice repeated


def test_rescale_slope_zero_is_refused_not_read_as_one(tree):
    dicoms, _ = ct_files(tree)
    rewrite_dicom(dicoms[1], RescaleSlope="0")
    with pytest.raises(DataError, match=f"{dicoms[1].name}: RescaleSlope 0 would make every voxel -1024"):
        dicom.read_series(dicoms)
    rewrite_dicom(dicoms[1], RescaleSlope=None)  # absent: stored values are the units
    assert dicom.read_series(dicoms)[0].shape == (SLICES, SIZE, SIZE)


def test_empty_case_folders_and_non_chaos_paths(tree, tmp_path):
    (tree / "CT" / "7").mkdir()
    with pytest.raises(DataError, match=r"CT/7/DICOM_anon: missing DICOM folder"):
        chaos.find_cases(tree)
    (tree / "CT" / "7" / "DICOM_anon").mkdir()
    with pytest.raises(DataError, match=r"CT/7/DICOM_anon: no DICOM files"):
        chaos.find_cases(tree)
    (tree / "CT" / "7" / "DICOM_anon").rmdir()
    (tree / "CT" / "7").rmdir()
    (tree / "MR" / "8").mkdir()
    with pytest.raises(DataError, match=r"MR/8: empty MR case folder"):
        chaos.find_cases(tree)
    with pytest.raises(DataError, match=r"MR/8: not a CHAOS folder"):
        chaos.find_cases(tree / "MR" / "8")
    elsewhere = tmp_path / "holiday_photos"
    elsewhere.mkdir()
    with pytest.raises(DataError, match="holiday_photos: not a CHAOS folder"):
        chaos.find_cases(elsewhere)
    with pytest.raises(DataError, match="nowhere: not a folder"):
        chaos.find_cases(tmp_path / "nowhere")


# --------------------------------------------------------------------------- limits


def test_dicom_size_limits_are_checked_before_decoding(tree, monkeypatch):
    dicoms, _ = ct_files(tree)
    rewrite_dicom(dicoms[0], Rows=60000)  # pixel data still 32 x 32: decoding would fail differently
    with pytest.raises(DataError, match=f"{dicoms[0].name}: 60000 x 32 pixels outside the limit of 1..4096"):
        dicom.read_series(dicoms)
    monkeypatch.setattr(limits, "MAX_DECODED_BYTES", SLICES * SIZE * SIZE * 4 - 1)  # float32 voxels
    with pytest.raises(DataError, match=f"{dicoms[1].name}: a 4 x 32 x 32 DICOM series of float32 decodes to 16384"):
        dicom.read_series(dicoms[1:] + dicoms[1:2])
    monkeypatch.setattr(dicom, "MAX_FILE_BYTES", 100)
    with pytest.raises(DataError, match=f"{dicoms[1].name}: .* exceeds the DICOM file limit of 100 bytes"):
        dicom.read_series(dicoms[1:])


def _png_with_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_png_pixel_limits(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_with_header(100_000, 100_000))  # 10^10 pixels claimed by a 70-byte file
    with pytest.raises(DataError, match="bomb.png"):
        labels.png_to_class_ids(bomb, "CT")
    big = tmp_path / "big.png"
    big.write_bytes(_png_with_header(5000, 5000))
    with pytest.raises(DataError, match="big.png: 5000 x 5000 pixels exceeds the PNG limit"):
        labels.png_to_class_ids(big, "CT")
    Image.new("L", (20, 20)).save(tmp_path / "ok.png")
    monkeypatch.setattr(labels, "MAX_PNG_PIXELS", 399)
    with pytest.raises(DataError, match="ok.png: 20 x 20 pixels exceeds the PNG limit of 399"):
        labels.png_to_class_ids(tmp_path / "ok.png", "CT")


def test_a_ground_truth_series_is_limited_by_its_decoded_size(tree, monkeypatch):
    _, pngs = ct_files(tree)
    monkeypatch.setattr(limits, "MAX_DECODED_BYTES", SLICES * SIZE * SIZE - 1)  # uint8 class ids
    with pytest.raises(DataError, match=f"{pngs[0].name}: a 4 x 32 x 32 ground-truth series of uint8 decodes"):
        labels.read_ground(pngs, "CT")


# --------------------------------------------------------------------------- NIfTI

nifti_affines = pytest.mark.parametrize(
    "affine",
    [np.diag([-1.5, 1.5, 4.0, 1.0]), np.array([[0, 0, 4.0, 0], [1.5, 0, 0, 0], [0, -1.5, 0, 0], [0, 0, 0, 1.0]])],
    ids=["axial", "slices-first"],
)


def _write_nifti(path: Path, data: np.ndarray) -> None:
    import nibabel

    nibabel.save(nibabel.Nifti1Image(data, np.diag([-1.5, 1.5, 4.0, 1.0])), path)


def test_nifti_pairs_and_their_errors(tmp_path, monkeypatch):
    image = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    label = np.zeros((4, 5, 3), np.uint8)
    label[1, 2, 0] = 4
    _write_nifti(tmp_path / "image_3.nii.gz", image)
    _write_nifti(tmp_path / "label_3.nii.gz", label)
    (case,) = chaos.find_cases(tmp_path)
    volume = chaos.load_case(case)
    assert volume.voxels.shape == (3, 5, 4)  # (k, j, i); j flipped to run posterior
    assert volume.geometry.spacing_mm == pytest.approx((4.0, 1.5, 1.5))
    assert volume.voxels[0, 5 - 1 - 2, 1] == image[1, 2, 0] and volume.labels[0, 2, 1] == 4

    _write_nifti(tmp_path / "label_3.nii.gz", label[:, :, :2])
    with pytest.raises(DataError, match=r"label_3.nii.gz: shape \(4, 5, 2\) differs from \(4, 5, 3\) of .*image_3.nii.gz"):
        chaos.load_case(case)
    label[0, 0, 0] = 7
    _write_nifti(tmp_path / "label_3.nii.gz", label)
    with pytest.raises(DataError, match="label_3.nii.gz: unknown label value 7"):
        chaos.load_case(case)
    monkeypatch.setattr(limits, "MAX_DECODED_BYTES", 60 * 4 - 1)
    with pytest.raises(DataError, match="image_3.nii.gz: a 4 x 5 x 3 NIfTI volume of float32 decodes to 240 bytes"):
        chaos.load_case(case)
    monkeypatch.setitem(__import__("sys").modules, "nibabel", None)
    with pytest.raises(DataError, match=r"scse_jax\[nifti\]"):
        chaos.load_case(case)


def test_a_nifti_decompression_bomb_is_refused_from_its_header(tmp_path, monkeypatch):
    """4096 x 4096 x 32 float64 (4 GiB decoded) declared by a file of a few hundred bytes."""
    import gzip

    nibabel = pytest.importorskip("nibabel")
    header = nibabel.Nifti1Header()
    header.set_data_shape((4096, 4096, 32))
    header.set_data_dtype(np.float64)
    header.set_sform(np.eye(4), code=1)
    bomb = tmp_path / "image_1.nii.gz"
    bomb.write_bytes(gzip.compress(header.binaryblock + bytes(4 + 1000)))
    for read in (nifti.num_slices, nifti.read_image):  # the header alone decides
        with pytest.raises(DataError, match="image_1.nii.gz: a 4096 x 4096 x 32 NIfTI volume of float64 decodes to 4294967296"):
            read(bomb)
    # Bytes, not voxels: the same shape passes as float32 and fails as float64.
    monkeypatch.setattr(limits, "MAX_DECODED_BYTES", 4 * 5 * 3 * 4)
    _write_nifti(tmp_path / "image_2.nii.gz", np.zeros((4, 5, 3), np.float32))
    assert nifti.read_image(tmp_path / "image_2.nii.gz")[0].shape == (3, 5, 4)
    _write_nifti(tmp_path / "image_2.nii.gz", np.zeros((4, 5, 3), np.float64))
    with pytest.raises(DataError, match="of float64 decodes to 480 bytes, over the limit of 240"):
        nifti.read_image(tmp_path / "image_2.nii.gz")


def _nifti_with(path: Path, problem: str) -> None:
    nibabel = pytest.importorskip("nibabel")
    if problem == "rgb":
        data = np.zeros((4, 5, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    else:
        data = np.zeros((0, 5, 3) if problem == "empty" else (4, 5, 3), np.float32)
    image = nibabel.Nifti1Image(data, np.eye(4))
    if problem == "singular":
        image.header.set_sform(np.array([[1.0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), code=2)
        image.header.set_qform(None, code=0)
        image = nibabel.Nifti1Image(image.dataobj, None, image.header)
    nibabel.save(image, path)


@pytest.mark.parametrize(
    "problem, message",
    [
        ("singular", r"the affine .* is singular or not finite"),
        ("rgb", "NIfTI data type RGB is not one gray value per voxel"),
        ("empty", r"expected a 3-D volume with voxels along every axis, got shape \(0, 5, 3\)"),
    ],
)
def test_nifti_headers_that_place_no_gray_volume_are_data_errors(tmp_path, problem, message):
    path = tmp_path / "image_1.nii.gz"
    _nifti_with(path, problem)
    for read in (nifti.num_slices, nifti.read_image):
        with pytest.raises(DataError, match=f"image_1.nii.gz: {message}"):
            read(path)
    _write_nifti(path, np.zeros((4, 5, 3), np.float32))
    _nifti_with(tmp_path / "label_1.nii.gz", problem)  # the same checks guard a label file
    with pytest.raises(DataError, match=f"label_1.nii.gz: {message}"):
        chaos.load_labels(chaos.find_cases(tmp_path)[0])


# --------------------------------------------------------------------------- fuzzing

_mutation = st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.integers(0, 10**6), st.integers(0, 255))


def _mutate(data: bytes, mutations) -> bytes:
    data = bytearray(data)
    for kind, position, value in mutations:
        if not data:
            break
        at = position % len(data)
        if kind == "flip":
            data[at] ^= value or 1
        elif kind == "insert":
            data[at:at] = bytes([value]) * (1 + value % 8)
        elif kind == "delete":
            del data[at : at + 1 + value % 8]
        else:
            del data[at:]
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_seeds(tiny_tree, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    dicom_bytes = sorted((tiny_tree / "MR" / "1" / "T2SPIR" / "DICOM_anon").iterdir())[1].read_bytes()
    png_bytes = sorted((tiny_tree / "MR" / "1" / "T2SPIR" / "Ground").iterdir())[1].read_bytes()
    return folder, dicom_bytes, png_bytes


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the damage it reads past
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzzed_dicom_raises_only_data_error(fuzz_seeds, mutations):
    folder, dicom_bytes, _ = fuzz_seeds
    path = folder / "fuzzed.dcm"
    path.write_bytes(_mutate(dicom_bytes, mutations))
    try:
        voxels, _ = dicom.read_series([path])
    except DataError:
        return
    assert voxels.dtype == np.float32 and voxels.ndim == 3


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the damage it reads past
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzzed_png_raises_only_data_error(fuzz_seeds, mutations):
    folder, _, png_bytes = fuzz_seeds
    path = folder / "fuzzed.png"
    path.write_bytes(_mutate(png_bytes, mutations))
    try:
        ids = labels.png_to_class_ids(path, "MR")
    except DataError:
        return
    assert ids.dtype == np.uint8 and ids.max() <= 4


@nifti_affines
def test_nifti_slice_count_from_the_header_equals_the_loaded_volume(tmp_path, affine):
    nibabel = pytest.importorskip("nibabel")
    path = tmp_path / "image_4.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((6, 5, 3), np.float32), affine), path)
    voxels, _ = nifti.read_image(path)
    assert nifti.num_slices(path) == voxels.shape[0]


@nifti_affines
def test_nifti_labels_alone_equal_those_of_the_whole_case(tmp_path, affine):
    nibabel = pytest.importorskip("nibabel")
    label = np.random.default_rng(0).integers(0, 5, (6, 5, 3)).astype(np.uint8)
    nibabel.save(nibabel.Nifti1Image(np.zeros((6, 5, 3), np.float32), affine), tmp_path / "image_4.nii.gz")
    nibabel.save(nibabel.Nifti1Image(label, affine), tmp_path / "label_4.nii.gz")
    (case,) = chaos.find_cases(tmp_path)
    np.testing.assert_array_equal(chaos.load_labels(case), chaos.load_case(case).labels)


def test_dicom_case_labels_alone_equal_those_of_the_whole_case(tree):
    for case in chaos.find_cases(tree):
        np.testing.assert_array_equal(chaos.load_labels(case), chaos.load_case(case).labels)
    case = chaos.find_cases(tree)[0]
    case.label_files[-1].unlink()
    with pytest.raises(DataError, match="DICOM files but"):
        chaos.load_labels(chaos.find_cases(tree)[0])


def test_patient_order_puts_numeric_ids_in_numeric_order_before_the_others():
    from scse_jax.data.types import patient_order

    assert sorted(["b", "10", "2", "a", "1"], key=patient_order) == ["1", "2", "10", "a", "b"]


def test_read_modality_names_the_file_of_a_series_that_is_neither_ct_nor_mr(tiny_tree, tmp_path):
    first_ct = sorted((ct_dir(tiny_tree) / "DICOM_anon").iterdir())[0]
    assert dicom.read_modality(first_ct) == "CT"
    dataset = pydicom.dcmread(first_ct)
    dataset.Modality = "US"
    path = tmp_path / "us.dcm"
    dataset.save_as(path)
    with pytest.raises(DataError, match=r"us\.dcm: Modality 'US' is neither CT nor MR"):
        dicom.read_modality(path)


def test_file_size_limit_and_an_unreadable_file_name_the_file(tmp_path):
    from scse_jax.data import limits

    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 101)
    with pytest.raises(DataError, match="big.png: 101 bytes exceeds the PNG file limit of 100 bytes"):
        limits.check_file_size(big, 100, "ground-truth PNG", "PNG file limit")
    with pytest.raises(DataError, match="gone.png: cannot read ground-truth PNG"):
        limits.check_file_size(tmp_path / "gone.png", 100, "ground-truth PNG", "PNG file limit")
    limits.check_file_size(big, 101, "ground-truth PNG", "PNG file limit")
