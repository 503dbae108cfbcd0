"""Tests of normalisation, resizing and the on-disk cache of prepared cases."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from scse_jax import postprocess
from scse_jax.data import preprocess
from scse_jax.data.preprocess import (
    PreparedCase,
    PreprocessSettings,
    normalise,
    prepare_case,
    prepare_cases,
    label_shares,
    resize_slices,
    resize_labels,
)
from scse_jax.data.types import Case, Geometry, Volume
from scse_jax.errors import ConfigError, DataError

SETTINGS = PreprocessSettings(image_size=16)


def make_case(folder: Path, patient: str = "1", modality: str = "MR", labelled: bool = True) -> Case:
    """A case whose 'files' exist (the cache key stats them); their content is never parsed."""
    (folder / "DICOM_anon").mkdir(parents=True, exist_ok=True)
    (folder / "Ground").mkdir(exist_ok=True)
    images, labels = [], []
    for index in range(3):
        image = folder / "DICOM_anon" / f"i{index:04d}.dcm"
        image.write_bytes(b"fake dicom %d" % index)
        images.append(image)
        if labelled:
            label = folder / "Ground" / f"liver_GT_{index:03d}.png"
            label.write_bytes(b"fake png %d" % index)
            labels.append(label)
    sequence = "CT" if modality == "CT" else "T2SPIR"
    return Case(patient, modality, sequence, tuple(images), tuple(labels), "dicom")


class CountingLoader:
    """Case -> a deterministic Volume of shape (3, 24, 20), counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, case: Case) -> Volume:
        self.calls += 1
        rng = np.random.default_rng(int(case.patient))
        voxels = rng.normal(100.0, 30.0, size=(3, 24, 20)).astype(np.float32)
        labels = None
        if case.label_files:
            labels = np.zeros((3, 24, 20), np.uint8)
            labels[:, 4:12, 2:8] = 1
            labels[:, 14:20, 12:18] = 3
        return Volume(voxels, Geometry.from_spacing((2.0, 0.75, 0.8)), labels)


@pytest.fixture
def case(tmp_path) -> Case:
    return make_case(tmp_path / "data" / "1")


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


# Normalisation -------------------------------------------------------------------------------


def test_ct_window_scales_to_unit_range():
    hu = np.array([[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]])
    out = normalise(hu, "CT", PreprocessSettings())
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_mr_is_robustly_z_scored():
    rng = np.random.default_rng(0)
    voxels = rng.gamma(2.0, 100.0, size=(4, 32, 32)).astype(np.float32)
    voxels[0, 0, 0] = 1e6  # a single hot voxel must not dominate
    out = normalise(voxels, "MR", PreprocessSettings())
    assert out.dtype == np.float32 and out.shape == voxels.shape
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1.0) < 1e-4
    assert out.max() < 10.0


def test_constant_mr_volume_becomes_zeros():
    out = normalise(np.full((2, 4, 4), 7.0), "MR", PreprocessSettings())
    assert np.all(out == 0)


def test_unknown_modality_is_a_config_error():
    with pytest.raises(ConfigError, match="PET"):
        normalise(np.zeros((1, 2, 2)), "PET", PreprocessSettings())


@pytest.mark.parametrize(
    "kwargs", [{"image_size": 0}, {"ct_window": (10.0, -10.0)}, {"mr_percentiles": (50.0, 101.0)}]
)
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        PreprocessSettings(**kwargs)


# Resizing ------------------------------------------------------------------------------------


def test_labels_stay_on_their_images_when_halved():
    # An organ starting on an odd row: halving averages rows 2j and 2j + 1 of the image, and the
    # labels must follow; nearest neighbour would take row 2j + 1 and move the outline.
    organ = np.zeros((1, 32, 32), np.uint8)
    organ[0, 5:21, 7:16] = 2
    on_grid = resize_labels(organ, (16, 16))
    image_on_grid = resize_slices((organ == 2).astype(np.float32), 16)
    assert on_grid.dtype == np.uint8 and on_grid.shape == (1, 16, 16)
    np.testing.assert_array_equal(on_grid[image_on_grid > 0.5], 2)
    np.testing.assert_array_equal(on_grid[image_on_grid < 0.5], 0)
    # Pixels half on the organ go to it on a checkerboard, to the background elsewhere.
    half = image_on_grid == 0.5
    checkerboard = (np.add.outer(np.arange(16), np.arange(16)) % 2 == 0)[None]
    np.testing.assert_array_equal(on_grid[half], np.where(checkerboard[half], 2, 0))


def test_resized_labels_take_the_largest_share_and_only_existing_classes():
    labels = np.zeros((1, 30, 20), np.uint8)
    labels[0, 10:20, 5:15] = 4
    labels[0, 0:6, 0:20] = 1
    out = resize_labels(labels, (15, 10))
    assert set(np.unique(out)) == {0, 1, 4}
    expected = np.zeros((1, 15, 10), np.uint8)
    expected[0, 5:10, 3:7] = 4  # every output pixel here covers 2 x 2 input pixels
    expected[0, 0:3] = 1
    np.testing.assert_array_equal(np.delete(out, [2, 7], axis=2), np.delete(expected, [2, 7], axis=2))
    for column in (2, 7):  # half on the organ: organ and background alternate down the column
        np.testing.assert_array_equal(out[0, 5:10, column] == 4, np.arange(5, 10) % 2 == column % 2)
    up = resize_labels(out, (30, 20))
    assert up.shape == (1, 30, 20) and np.mean(up == labels) > 0.95
    assert resize_labels(np.zeros((0, 8, 8), np.uint8), (4, 4)).shape == (0, 4, 4)


def test_label_shares_are_each_classes_part_of_the_pixel():
    # Halving: each output pixel covers 2 x 2 native pixels, so its shares are quarters, they sum
    # to 1, and where one class holds more than half, it is the class resize_labels picks.
    rows, cols = np.mgrid[0:64, 0:64]
    labels = np.zeros((2, 64, 64), np.uint8)
    labels[:, ((rows - 30.3) ** 2 + (cols - 25.6) ** 2) < 14.2**2] = 1
    labels[1, 40:53, 37:60] = 3
    shares = label_shares(labels, (32, 32), 5)
    assert shares.shape == (2, 32, 32, 5) and shares.dtype == np.float32
    np.testing.assert_allclose(shares.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.unique(shares), [0.0, 0.25, 0.5, 0.75, 1.0])
    expected = labels.reshape(2, 32, 2, 32, 2)
    for class_id in range(5):
        np.testing.assert_allclose(shares[..., class_id], (expected == class_id).mean(axis=(2, 4)))
    decisive = shares.max(-1) > 0.5
    np.testing.assert_array_equal(shares.argmax(-1)[decisive], resize_labels(labels, (32, 32))[decisive])
    with pytest.raises(DataError, match=r"label values must lie in \[0, 3\)"):
        label_shares(labels, (32, 32), 3)


def test_halving_keeps_organ_areas():
    # Ties all given to organs would grow each organ by some per cent, all given to the
    # background shrink it; the checkerboard keeps the area.
    rows, cols = np.mgrid[0:256, 0:256]
    labels = np.zeros((1, 256, 256), np.uint8)
    labels[0][((rows - 100.3) ** 2 + (cols - 90.6) ** 2) < 40.2**2] = 1
    labels[0][((rows - 190.1) ** 2 / 2 + (cols - 180.7) ** 2) < 25.5**2] = 3
    out = resize_labels(labels, (128, 128))
    for class_id in (1, 3):
        assert (out == class_id).sum() * 4 / (labels == class_id).sum() == pytest.approx(1.0, abs=0.01)


def test_bilinear_resize_of_images():
    ramp = np.tile(np.arange(32, dtype=np.float32), (1, 32, 1))  # columns 0..31
    out = resize_slices(ramp, 16)
    assert out.dtype == np.float32 and out.shape == (1, 16, 16)
    # Pixel centres map onto pixel centres: output column j averages input columns 2j, 2j+1.
    np.testing.assert_allclose(out[0, 0], np.arange(16) * 2 + 0.5, atol=1e-5)
    constant = np.full((2, 10, 14), 3.25, np.float32)
    np.testing.assert_allclose(resize_slices(constant, 7), 3.25, atol=1e-6)
    up = resize_slices(ramp, 64)
    assert up.min() >= 0.0 and up.max() <= 31.0
    assert np.all(np.diff(up[0, 0]) >= 0)


# prepare_case and the cache ------------------------------------------------------------------


def test_prepare_case_shapes_and_types(case):
    prepared = prepare_case(case, SETTINGS, load=CountingLoader())
    assert isinstance(prepared, PreparedCase)
    assert prepared.case_key == "MR_1_T2SPIR" and prepared.patient == "1"
    assert prepared.images.shape == (3, 16, 16) and prepared.images.dtype == np.float32
    assert prepared.labels.shape == (3, 16, 16) and prepared.labels.dtype == np.uint8
    assert prepared.native_labels.shape == (3, 24, 20) and prepared.native_labels.dtype == np.uint8
    assert prepared.native_shape == (3, 24, 20)
    assert prepared.geometry.spacing_mm == (2.0, 0.75, 0.8)
    assert set(np.unique(prepared.labels)) == {0, 1, 3}


def test_unlabelled_case_has_no_labels(tmp_path, cache_dir):
    case = make_case(tmp_path / "data" / "2", patient="2", labelled=False)
    for _ in range(2):  # built, then read from the cache
        prepared = prepare_case(case, SETTINGS, cache_dir, load=CountingLoader())
        assert prepared.labels is None and prepared.native_labels is None


def test_second_run_reads_the_cache_without_loading(case, cache_dir):
    loader = CountingLoader()
    first = prepare_case(case, SETTINGS, cache_dir, load=loader)
    second = prepare_case(case, SETTINGS, cache_dir, load=loader)
    assert loader.calls == 1
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.native_labels, second.native_labels)
    np.testing.assert_array_equal(first.geometry.index_to_patient, second.geometry.index_to_patient)
    assert first.geometry.spacing_mm == second.geometry.spacing_mm
    assert (first.case_key, first.patient, first.native_shape) == (
        second.case_key,
        second.patient,
        second.native_shape,
    )
    assert len(list(cache_dir.glob("*.npz"))) == 1


def test_changed_settings_or_source_file_miss_the_cache(case, cache_dir):
    loader = CountingLoader()
    prepare_case(case, SETTINGS, cache_dir, load=loader)
    prepare_case(case, PreprocessSettings(image_size=8), cache_dir, load=loader)
    assert loader.calls == 2
    stat = os.stat(case.image_files[0])
    os.utime(case.image_files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    prepare_case(case, SETTINGS, cache_dir, load=loader)
    assert loader.calls == 3


def test_cache_entries_load_without_pickle(case, cache_dir):
    prepare_case(case, SETTINGS, cache_dir, load=CountingLoader())
    (entry,) = cache_dir.glob("*.npz")
    with np.load(entry, allow_pickle=False) as stored:
        assert all(stored[name].dtype != object for name in stored.files)


@pytest.mark.parametrize(
    "damage",
    [
        "truncate",  # a writer killed after the rename could never leave this, but a disk could
        "garbage",
        "empty",
    ],
)
def test_damaged_entry_is_rebuilt_with_a_warning(case, cache_dir, caplog, damage):
    loader = CountingLoader()
    good = prepare_case(case, SETTINGS, cache_dir, load=loader)
    (entry,) = cache_dir.glob("*.npz")
    content = entry.read_bytes()
    entry.write_bytes(
        {"truncate": content[: len(content) // 2], "garbage": b"not a zip file" * 10, "empty": b""}[damage]
    )
    with caplog.at_level(logging.WARNING):
        rebuilt = prepare_case(case, SETTINGS, cache_dir, load=loader)
    assert loader.calls == 2
    assert "damaged" in caplog.text and entry.name in caplog.text
    np.testing.assert_array_equal(rebuilt.images, good.images)
    with np.load(entry, allow_pickle=False) as stored:  # the rebuilt entry is whole again
        np.testing.assert_array_equal(stored["images"], good.images)
    prepare_case(case, SETTINGS, cache_dir, load=loader)
    assert loader.calls == 2


def test_tampered_array_is_caught_by_the_digest(case, cache_dir, caplog):
    loader = CountingLoader()
    prepare_case(case, SETTINGS, cache_dir, load=loader)
    (entry,) = cache_dir.glob("*.npz")
    with np.load(entry, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["images"] = arrays["images"] + 1.0  # a well-formed file with the wrong content
    with open(entry, "wb") as handle:
        np.savez(handle, **arrays)
    with caplog.at_level(logging.WARNING):
        prepare_case(case, SETTINGS, cache_dir, load=loader)
    assert loader.calls == 2 and "digest" in caplog.text


def test_leftover_temp_file_is_ignored(case, cache_dir):
    """A writer killed before its rename leaves only a temp file, which is never read."""
    loader = CountingLoader()
    final = preprocess.cache_path(case, SETTINGS, cache_dir)
    cache_dir.mkdir()
    leftover = cache_dir / f"{preprocess._TEMP_PREFIX}{final.stem}-killed.npz"
    leftover.write_bytes(b"PK\x03\x04 half written")
    prepared = prepare_case(case, SETTINGS, cache_dir, load=loader)
    assert loader.calls == 1 and prepared.images.shape == (3, 16, 16)
    assert final.is_file()
    prepare_case(case, SETTINGS, cache_dir, load=loader)
    assert loader.calls == 1


def test_failed_write_leaves_no_entry_and_no_temp_file(case, cache_dir, monkeypatch):
    """Simulates a kill during the write: nothing at the final name, nothing left behind."""

    def interrupted_savez(handle, **arrays):
        handle.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess.np, "savez_compressed", interrupted_savez)
    with pytest.raises(KeyboardInterrupt):
        prepare_case(case, SETTINGS, cache_dir, load=CountingLoader())
    assert list(cache_dir.iterdir()) == []


def test_cache_inside_the_data_folder_is_refused(case):
    data_folder = Path(case.image_files[0]).parents[1]
    loader = CountingLoader()
    with pytest.raises(ConfigError, match="inside the data folder"):
        prepare_case(case, SETTINGS, data_folder / "cache", load=loader)
    assert loader.calls == 0
    assert not (data_folder / "cache").exists()


def test_bad_volumes_are_data_errors(case):
    def mismatched(case):
        labels = np.zeros((3, 8, 9), np.uint8)
        return Volume(np.zeros((3, 8, 8), np.float32), Geometry.from_spacing((1, 1, 1)), labels)

    def non_finite(case):
        voxels = np.zeros((3, 8, 8), np.float32)
        voxels[1, 2, 3] = np.nan
        return Volume(voxels, Geometry.from_spacing((1, 1, 1)))

    with pytest.raises(DataError, match="i0000.dcm"):
        prepare_case(case, SETTINGS, load=mismatched)
    with pytest.raises(DataError, match="non-finite"):
        prepare_case(case, SETTINGS, load=non_finite)


def test_missing_source_file_is_a_data_error(case, cache_dir):
    os.remove(case.label_files[1])
    with pytest.raises(DataError, match="liver_GT_001.png"):
        prepare_case(case, SETTINGS, cache_dir, load=CountingLoader())


def test_prepare_cases_reports_progress(tmp_path, cache_dir, capsys):
    cases = [make_case(tmp_path / "data" / p, patient=p, modality=m) for p, m in (("1", "CT"), ("2", "MR"))]
    loader = CountingLoader()
    prepared = prepare_cases(cases, SETTINGS, cache_dir, load=loader)
    assert [p.case_key for p in prepared] == ["CT_1_CT", "MR_2_T2SPIR"]
    assert prepared[0].images.min() >= 0.0 and prepared[0].images.max() <= 1.0  # CT window
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "[1/2] CT_1_CT: prepared" in lines[0]
    prepare_cases(cases, SETTINGS, cache_dir, load=loader, progress=True)
    assert "[2/2] MR_2_T2SPIR: cached" in capsys.readouterr().err
    prepare_cases(cases, SETTINGS, cache_dir, load=loader, progress=False)
    assert capsys.readouterr().err == ""
    assert loader.calls == 2


# On CHAOS-format files ------------------------------------------------------------------------


def test_synthetic_chaos_cases_prepare_and_cache(tmp_path, monkeypatch):
    from scse_jax.data import chaos, synthetic

    root = synthetic.write_synthetic_chaos(tmp_path / "data", patients=2, slices=4, size=32, modalities=("CT", "MR"))
    cases = [c for c in chaos.find_cases(root) if c.sequence in ("CT", "T2SPIR")]
    assert {c.modality for c in cases} == {"CT", "MR"}
    calls = []

    def counting_load(case, **kwargs):
        calls.append(case.key)
        return original_load(case, **kwargs)

    original_load = chaos.load_case
    monkeypatch.setattr(chaos, "load_case", counting_load)  # the default loader
    cache_dir = tmp_path / "cache"
    first = prepare_cases(cases, SETTINGS, cache_dir, progress=False)
    second = prepare_cases(cases, SETTINGS, cache_dir, progress=False)
    assert len(calls) == len(cases)
    assert not any("tmp" in p.name for p in root.rglob("*")) and not any(root.rglob("*.npz"))
    for case, prepared, cached in zip(cases, first, second):
        assert prepared.native_shape == (4, 32, 32) and prepared.images.shape == (4, 16, 16)
        np.testing.assert_array_equal(prepared.images, cached.images)
        np.testing.assert_array_equal(prepared.native_labels, cached.native_labels)
        assert set(np.unique(prepared.labels)) <= set(range(len(case.class_names)))
        assert prepared.native_labels.any() and prepared.labels.any()
        if case.modality == "CT":
            assert 0.0 <= prepared.images.min() and prepared.images.max() <= 1.0
        else:
            assert abs(float(prepared.images.mean())) < 0.5


def test_real_ct_sample_prepares_at_native_geometry(ct_sample_dir, tmp_path):
    from scse_jax.data import chaos

    (case,) = chaos.find_cases(ct_sample_dir)
    prepared = prepare_case(case, PreprocessSettings(image_size=64), tmp_path / "cache")
    assert prepared.native_shape == (78, 512, 512)
    assert prepared.geometry.spacing_mm == pytest.approx((2.0, 0.7265625, 0.7265625))
    assert prepared.images.shape == (78, 64, 64) and 0.0 <= prepared.images.min() <= prepared.images.max() <= 1.0
    assert prepared.native_labels.shape == (78, 512, 512) and set(np.unique(prepared.native_labels)) == {0, 1}
    # Mapping the training-grid labels back (as probabilities, as predictions are) loses little
    # of the liver at a factor of 8.
    one_hot = np.eye(2, dtype=np.float32)[prepared.labels]
    back = postprocess.to_native(one_hot, (512, 512), largest_component=False)
    liver = prepared.native_labels == 1
    dice = 2 * (back[liver] == 1).sum() / ((back == 1).sum() + liver.sum())
    assert dice > 0.95
