"""The predict command: CHAOS submission PNGs, NIfTI with the DICOM geometry, no overwriting."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scse_jax import predict
from scse_jax.data import chaos, dicom


@pytest.fixture(scope="module")
def png_output(tiny_trained_run, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "submission"
    assert predict.main(["--checkpoint", str(tiny_trained_run[0]), "--input", str(tiny_data[0]), "--output", str(out)]) == 0
    return out


def test_png_submission_layout_names_and_gray_values(png_output, tiny_data, capsys):
    cases = chaos.find_cases(tiny_data[0], sequences=["T2SPIR"])
    assert not list(png_output.rglob("T1DUAL"))  # the model was trained on T2SPIR only
    for case in cases:
        folder = png_output / "MR" / case.patient / "T2SPIR" / "Results"
        names = sorted(p.name for p in folder.glob("*.png"))
        assert names == sorted(f"{Path(f).stem}.png" for f in case.image_files)
        for path in folder.glob("*.png"):
            image = np.asarray(Image.open(path))
            assert image.dtype == np.uint8 and image.shape == (32, 32)
            assert set(np.unique(image)) <= {0, 63, 126, 189, 252}


def test_existing_results_are_not_overwritten_without_force(png_output, tiny_trained_run, tiny_data, capsys):
    some = next(png_output.rglob("*.png"))
    some.write_bytes(b"keep me")
    args = ["--checkpoint", str(tiny_trained_run[0]), "--input", str(tiny_data[0]), "--output", str(png_output)]
    assert predict.main(args) == 1
    assert "--force" in capsys.readouterr().err
    assert some.read_bytes() == b"keep me"
    assert predict.main(args + ["--force"]) == 0
    assert some.read_bytes() != b"keep me"
    assert not list(png_output.rglob(".tmp-*"))


@pytest.mark.parametrize("output_is_input", [False, True])
def test_force_never_replaces_a_folder_it_did_not_write(tiny_trained_run, tiny_data, tmp_path, capsys, output_is_input):
    series = next(p.parent for p in sorted(tiny_data[0].rglob("*.dcm")))
    if output_is_input:  # the DICOM folder itself given as --output
        copy = tmp_path / "series"
        shutil.copytree(series, copy)
        series = output = copy
    else:
        output = tmp_path / "mine"
        output.mkdir()
        (output / "notes.txt").write_text("the user's own")
    before = sorted(p.name for p in output.iterdir())
    for fmt in ("png", "nifti"):
        args = ["--checkpoint", str(tiny_trained_run[0]), "--input", str(series), "--output", str(output)]
        assert predict.main(args + ["--format", fmt, "--force"]) == 1
        assert "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == before


def test_force_replaces_a_single_series_result_it_wrote(tiny_trained_run, tiny_data, tmp_path):
    series = next(p.parent for p in sorted(tiny_data[0].rglob("*.dcm")))
    args = ["--checkpoint", str(tiny_trained_run[0]), "--input", str(series), "--output", str(tmp_path / "out")]
    assert predict.main(args) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert predict.main(args) == 1
    assert predict.main(args + ["--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == written


def test_single_series_to_nifti_carries_the_dicom_geometry(tiny_trained_run, tiny_data, tmp_path):
    nibabel = pytest.importorskip("nibabel")
    case = chaos.find_cases(tiny_data[0], sequences=["T2SPIR"])[1]
    folder = case.image_files[0].parent
    args = ["--checkpoint", str(tiny_trained_run[0]), "--input", str(folder), "--output", str(tmp_path / "out")]
    assert predict.main(args + ["--format", "nifti"]) == 0
    image = nibabel.load(str(tmp_path / "out" / "segmentation.nii.gz"))
    voxels, geometry = dicom.read_series(dicom.series_files(folder))
    assert image.shape == voxels.shape[::-1]
    # NIfTI voxel (col, row, slice) must land where the DICOM puts (slice, row, col), in RAS.
    index = np.array([[2, 5, 7], [0, 0, 0], [len(voxels) - 1, 31, 30]])
    lps = geometry.to_patient_mm(index)
    ras = nibabel.affines.apply_affine(image.affine, index[:, ::-1])
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-4)


def test_patient_ids_cannot_escape_the_output_folder(tmp_path):
    for hostile in ("../../etc", "..", ".", "", "a/b\\c"):
        name = predict.safe_name(hostile)
        assert "/" not in name and "\\" not in name and name not in ("", ".", "..")
    path = predict.case_output_dir(tmp_path, "MR", "../../evil", "T2SPIR")
    assert tmp_path.resolve() in path.resolve().parents


def test_bad_input_is_one_line(tiny_trained_run, tmp_path, capsys):
    args = ["--checkpoint", str(tiny_trained_run[0]), "--input", str(tmp_path / "missing"), "--output", str(tmp_path)]
    assert predict.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


def test_which_that_is_no_step_is_one_line(tiny_trained_run, tiny_data, tmp_path, capsys):
    args = ["--checkpoint", str(tiny_trained_run[0]), "--input", str(tiny_data[0]), "--output", str(tmp_path / "out")]
    assert predict.main([*args, "--which", "abc"]) == 1
    assert capsys.readouterr().err == "error: checkpoint 'abc': expected latest, best or a step number (which=, --which)\n"
    assert not (tmp_path / "out").exists()


def test_the_command_keeps_compiled_prediction_in_the_runs_compile_cache(tiny_trained_run, tiny_data, tmp_path, monkeypatch):
    from scse_jax import compilation
    from scse_jax.prediction import Predictor

    calls, predict_fn = [], Predictor.predict
    monkeypatch.setattr(compilation, "use_compilation_cache", lambda data: calls.append(("cache", data.cache_dir)))
    monkeypatch.setattr(Predictor, "predict", lambda *a, **k: calls.append(("predict",)) or predict_fn(*a, **k))
    series = next(p.parent for p in sorted(tiny_data[0].rglob("*.dcm")))
    args = ["--checkpoint", str(tiny_trained_run[0]), "--input", str(series), "--output", str(tmp_path / "out")]
    assert predict.main(args) == 0
    assert calls[0] == ("cache", str(tiny_data[1])) and calls[1:] == [("predict",)]


def test_the_exported_model_is_the_run_s_eval_checkpoint_as_evaluate_scores_by_default(
    tiny_trained_run, tiny_data, tmp_path, monkeypatch
):
    from scse_jax import evaluate
    from scse_jax.inference import Segmenter

    chosen = []
    restore = Segmenter.from_checkpoint.__func__

    def recorded(cls, path, **kwargs):
        segmenter = restore(cls, path, **kwargs)
        chosen.append((kwargs["which"], segmenter.step))
        return segmenter

    monkeypatch.setattr(Segmenter, "from_checkpoint", classmethod(recorded))
    args = ["--checkpoint", str(tiny_trained_run[0]), "--input", str(tiny_data[0]), "--output", str(tmp_path / "out")]
    assert predict.main(args) == 0
    assert evaluate.main(["--checkpoint", str(tiny_trained_run[0])]) == 0
    best = restore(Segmenter, tiny_trained_run[0], which="best").step  # the run's eval.checkpoint
    assert chosen == [(None, best), (None, best)]
