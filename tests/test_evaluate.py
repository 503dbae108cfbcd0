"""The evaluate command: the official CHAOS example, synthetic CT/MR series, errors, tables."""

import csv
import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from scse_jax import evaluate, metrics
from scse_jax.data.labels import class_ids_to_gray

# Printed by the CHAOS challenge's evaluation (emrekavur/CHAOS-evaluation README, MATLAB and
# Julia versions) for its sample Data_3D/Segmentation against Data_3D/Ground.
OFFICIAL_CT_SAMPLE = {"dice": 0.978, "ravd": 0.665, "assd": 0.734, "mssd": 14.0}
METRIC_KEYS = {"dice", "jaccard", "ravd", "assd", "mssd"}

SLICE_STEP_MM = 3.0  # from ImagePositionPatient; SliceThickness below says otherwise
ROW_SPACING_MM, COL_SPACING_MM = 0.5, 0.8


def write_dicom_series(folder, modality, num_slices, rows, cols):
    folder.mkdir()
    for index in range(num_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4" if modality == "MR" else "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelSpacing = [ROW_SPACING_MM, COL_SPACING_MM]
        ds.SliceThickness = 5.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-40.0, -30.0, 100.0 - SLICE_STEP_MM * index]
        ds.PixelData = np.full((rows, cols), 1000, dtype=np.uint16).tobytes()
        ds.save_as(folder / f"i{index:04d},0000b.dcm", enforce_file_format=True)


def write_png_series(folder, gray_volume, name="slice"):
    folder.mkdir()
    for index, gray in enumerate(gray_volume):
        Image.fromarray(gray.astype(np.uint8)).save(folder / f"{name}_{index:03d}.png")


def mr_labels(num_slices=6, rows=16, cols=20):
    labels = np.zeros((num_slices, rows, cols), dtype=np.uint8)
    labels[1:5, 2:8, 2:9] = 1  # liver
    labels[1:4, 10:14, 2:6] = 2  # right kidney
    labels[2:5, 10:14, 8:12] = 3  # left kidney
    labels[1:4, 2:6, 12:16] = 4  # spleen
    return labels


@pytest.fixture
def mr_case(tmp_path):
    """An MR series: the segmentation moves the right kidney one column, the spleen one slice."""
    ground = mr_labels()
    seg = ground.copy()
    seg[ground == 2] = 0
    seg[np.roll(ground == 2, 1, axis=2)] = 2
    seg[ground == 4] = 0
    seg[np.roll(ground == 4, 1, axis=0)] = 4
    write_dicom_series(tmp_path / "DICOM_anon", "MR", *ground.shape)
    write_png_series(tmp_path / "Ground", class_ids_to_gray(ground))
    write_png_series(tmp_path / "Segmentation", class_ids_to_gray(seg), name="results")
    return tmp_path


@pytest.fixture
def ct_case(tmp_path):
    ground = np.zeros((5, 12, 12), dtype=np.uint8)
    ground[1:4, 3:9, 3:9] = 255
    seg = np.roll(ground, 1, axis=1) // 255 * 63  # liver drawn as 63, like the real sample
    write_dicom_series(tmp_path / "DICOM_anon", "CT", *ground.shape)
    write_png_series(tmp_path / "Ground", ground)
    write_png_series(tmp_path / "Segmentation", seg, name="results")
    return tmp_path


def run_main(capsys, case_dir, *extra, seg="Segmentation"):
    argv = ["--ground", str(case_dir / "Ground"), "--seg", str(case_dir / seg), "--dicom", str(case_dir / "DICOM_anon")]
    code = evaluate.main(argv + list(extra))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_real_ct_sample_gives_the_official_values(capsys, ct_sample_dir):
    code, out, err = run_main(capsys, ct_sample_dir, "--json")
    assert code == 0, err
    scores = json.loads(out)
    assert set(scores) == METRIC_KEYS
    for name, official in OFFICIAL_CT_SAMPLE.items():
        assert round(scores[name], 3) == pytest.approx(official), name
    assert 0.9 < scores["jaccard"] < scores["dice"]
    code, out, _ = run_main(capsys, ct_sample_dir)
    assert out.strip() == "DICE=0.978 JACCARD=0.958 RAVD=0.665 ASSD=0.734 MSSD=14.000"


def test_mr_scores_each_organ_in_patient_millimetres(capsys, mr_case):
    code, out, err = run_main(capsys, mr_case, "--json")
    assert code == 0, err
    scores = json.loads(out)
    assert list(scores) == ["liver", "right_kidney", "left_kidney", "spleen"]
    assert all(set(organ) == METRIC_KEYS for organ in scores.values())
    for organ in ("liver", "left_kidney"):
        assert scores[organ] == {"dice": 1.0, "jaccard": 1.0, "ravd": 0.0, "assd": 0.0, "mssd": 0.0}
    # One column over: the largest distance is one column spacing (PixelSpacing[1]).
    assert scores["right_kidney"]["mssd"] == pytest.approx(COL_SPACING_MM)
    assert scores["right_kidney"]["dice"] == pytest.approx(3 / 4)
    # One slice over: the slice step from the positions, not SliceThickness.
    assert scores["spleen"]["mssd"] == pytest.approx(SLICE_STEP_MM)
    assert scores["spleen"]["dice"] == pytest.approx(2 / 3)
    assert scores["spleen"]["ravd"] == 0.0
    code, out, _ = run_main(capsys, mr_case)
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["liver", "right_kidney", "left_kidney", "spleen"]
    assert "DICE=1.000" in lines[0]


def test_ct_is_binary_whatever_the_gray_value(capsys, ct_case):
    code, out, err = run_main(capsys, ct_case, "--json")
    assert code == 0, err
    scores = json.loads(out)
    assert set(scores) == METRIC_KEYS
    assert scores["dice"] == pytest.approx(5 / 6)
    assert scores["mssd"] == pytest.approx(ROW_SPACING_MM)


def test_empty_prediction_writes_null_distances(capsys, ct_case):
    seg = ct_case / "Empty"
    write_png_series(seg, np.zeros((5, 12, 12)))
    code, out, err = run_main(capsys, ct_case, "--json", seg="Empty")
    assert code == 0, err
    assert json.loads(out) == {"dice": 0.0, "jaccard": 0.0, "ravd": 100.0, "assd": None, "mssd": None}


def assert_one_error_line(code, err, *fragments):
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_missing_directory(capsys, ct_case):
    code, out, err = run_main(capsys, ct_case, seg="Nowhere")
    assert_one_error_line(code, err, "Nowhere", "no such directory")
    assert out == ""


def test_count_mismatch(capsys, ct_case):
    sorted((ct_case / "Segmentation").glob("*.png"))[-1].unlink()
    code, _, err = run_main(capsys, ct_case)
    assert_one_error_line(code, err, "4 segmentation PNGs but 5 DICOM files")


def test_size_mismatch(capsys, ct_case):
    write_png_series(ct_case / "Small", np.zeros((5, 12, 10)))
    code, _, err = run_main(capsys, ct_case, seg="Small")
    assert_one_error_line(code, err, "Small", "10 x 12", "12 x 12")


def test_unknown_mr_gray_value(capsys, mr_case):
    bad = np.array(Image.open(sorted((mr_case / "Segmentation").glob("*.png"))[2]))
    bad[0, 0] = 90
    Image.fromarray(bad).save(sorted((mr_case / "Segmentation").glob("*.png"))[2])
    code, _, err = run_main(capsys, mr_case)
    assert_one_error_line(code, err, "results_002.png", "90")


def test_command_line_entry_point_reports_errors_without_traceback(tmp_path):
    missing = str(tmp_path / "missing")
    result = subprocess.run(
        [sys.executable, "-m", "scse_jax.evaluate", "--ground", missing, "--seg", missing, "--dicom", missing],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_error_line(result.returncode, result.stderr, "missing")


ROWS = [
    {"patient": "1", "organ": "liver", "dice": 0.97841, "jaccard": 0.9578, "ravd": 0.66453, "assd": 0.7341, "mssd": 14.0},
    {"patient": "2", "organ": "spleen", "dice": 0.0, "jaccard": 0.0, "ravd": 100.0, "assd": math.inf, "mssd": math.inf},
]


def test_results_table():
    lines = evaluate.results_table(ROWS).splitlines()
    assert lines[0] == "| patient | organ | Dice | Jaccard | RAVD (%) | ASSD (mm) | MSSD (mm) |"
    assert lines[2] == "| 1 | liver | 0.978 | 0.958 | 0.665 | 0.734 | 14.000 |"
    assert lines[3] == "| 2 | spleen | 0.000 | 0.000 | 100.000 | inf | inf |"
    assert len(lines) == 4


def test_dice_table_lists_each_organ_and_the_mean():
    summary = evaluate.summarise_rows([{**row, "volume_ratio": 1.0} for row in ROWS], ("background", "liver", "spleen"))
    lines = evaluate.dice_table(summary).splitlines()
    assert [line.split() for line in lines] == [
        ["organ", "dice", "jaccard"], ["liver", "0.978", "0.958"], ["spleen", "0.000", "0.000"], ["mean", "0.489", "0.479"]
    ]


def test_write_csv_round_trip(tmp_path):
    path = tmp_path / "out" / "scores.csv"
    evaluate.write_csv(ROWS, path)
    with path.open(newline="") as stream:
        read = list(csv.DictReader(stream))
    assert list(read[0]) == ["patient", "organ", "dice", "jaccard", "ravd", "assd", "mssd", "volume_ratio"] + list(
        metrics.FALSE_POSITIVE_SITES
    )
    assert [row["patient"] for row in read] == ["1", "2"]
    assert float(read[0]["dice"]) == ROWS[0]["dice"] and math.isinf(float(read[1]["assd"]))
    assert [p.name for p in path.parent.iterdir()] == ["scores.csv"]


def test_checkpoint_scoring_reads_only_its_split_and_matches_the_runs_validation(tiny_trained_run, tmp_path, monkeypatch):
    from scse_jax.data import preprocess

    run, _, summary = tiny_trained_run
    read = []
    prepare = preprocess._prepare_with_status
    monkeypatch.setattr(
        preprocess, "_prepare_with_status", lambda case, *args: read.append(case.patient) or prepare(case, *args)
    )
    code = evaluate.main(["--checkpoint", str(run), "--split", "val", "--csv", str(tmp_path / "val.csv")])
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "val.csv").open()))
    val_patients = {row["patient"] for row in rows}
    assert len(val_patients) == 1 and set(read) == val_patients  # no other patient prepared
    for organ, dice in summary["dice"].items():
        row = next(r for r in rows if r["organ"] == organ)
        assert float(row["dice"]) == pytest.approx(dice, abs=1e-6)
        assert float(row["volume_ratio"]) == pytest.approx(summary["volume_ratio"][organ], abs=1e-6)


def test_csv_naming_a_folder_is_refused_before_scoring(tiny_trained_run, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("scored before the --csv path was checked")

    monkeypatch.setattr(evaluate, "score_checkpoint", never)
    code = evaluate.main(["--checkpoint", str(tiny_trained_run[0]), "--csv", str(tmp_path)])
    assert_one_error_line(code, capsys.readouterr().err, f"--csv {tmp_path} is a folder")
    (tmp_path / "a_file").write_text("mine")
    code = evaluate.main(["--checkpoint", str(tiny_trained_run[0]), "--csv", str(tmp_path / "a_file" / "s.csv")])
    assert_one_error_line(code, capsys.readouterr().err, "a_file is a file, not a folder")


def test_which_that_is_no_step_is_one_line(tiny_trained_run, capsys):
    code = evaluate.main(["--checkpoint", str(tiny_trained_run[0]), "--which", "abc"])
    assert_one_error_line(code, capsys.readouterr().err, "checkpoint 'abc': expected latest, best or a step number (which=, --which)")


def test_a_checkpoint_from_elsewhere_never_creates_its_cache_dir(tiny_trained_run, tmp_path, monkeypatch):
    """Its saved data.cache_dir names a folder of another machine: this one's default cache is used."""
    import shutil

    run = shutil.copytree(tiny_trained_run[0], tmp_path / "run")
    elsewhere = tmp_path / "elsewhere" / "cache"
    for metadata in run.glob("checkpoints/*/meta/metadata"):
        meta = json.loads(metadata.read_text())
        meta["config"]["data"]["cache_dir"] = str(elsewhere)
        metadata.write_text(json.dumps(meta))
    monkeypatch.setenv("SCSE_JAX_CACHE", str(tmp_path / "default_cache"))
    rows, _, _, _ = evaluate.score_checkpoint(run, split="val")
    assert rows and not (tmp_path / "elsewhere").exists()
    assert list((tmp_path / "default_cache" / "prepared").glob("*.npz"))


def test_checkpoint_scoring_keeps_compiled_prediction_in_the_runs_compile_cache(tiny_trained_run, monkeypatch):
    from scse_jax import compilation
    from scse_jax.prediction import Predictor

    calls, predict = [], Predictor.predict
    monkeypatch.setattr(compilation, "use_compilation_cache", lambda data: calls.append(("cache", data.cache_dir)))
    monkeypatch.setattr(Predictor, "predict", lambda *a, **k: calls.append(("predict",)) or predict(*a, **k))
    assert evaluate.main(["--checkpoint", str(tiny_trained_run[0]), "--split", "val"]) == 0
    run_cache = json.loads((tiny_trained_run[0] / "config.json").read_text())["data"]["cache_dir"]
    assert calls[0] == ("cache", run_cache) and set(calls[1:]) == {("predict",)}


def test_mean_dice_averages_the_organs_dice():
    labels = np.zeros((2, 8, 8), np.uint8)
    labels[:, 2:6, 2:6] = 1  # organ 1: 32 voxels
    labels[:, 6:8, 6:8] = 2  # organ 2: 8 voxels
    case = types.SimpleNamespace(patient="p", native_labels=labels, geometry=(1.0, 1.0, 1.0))
    prediction = labels.copy()
    prediction[:, 2:6, 2:4] = 0  # organ 1 half found: Dice 2*16/(16+32) = 2/3; organ 2 exact
    names = ("background", "a", "b")
    assert evaluate.mean_dice(prediction, case, names) == pytest.approx((2 / 3 + 1) / 2)
    assert evaluate.mean_dice(labels, case, names) == pytest.approx(1.0)
