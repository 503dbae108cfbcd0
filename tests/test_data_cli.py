"""`python -m scse_jax.data info|synth`: output, exit codes, one-line errors without tracebacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scse_jax.data.__main__ import main

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "scse_jax.data", *map(str, args)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def synth_tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tree"
    assert main(["synth", str(out), "--patients", "2", "--size", "32", "--slices", "3", "--seed", "5"]) == 0
    return out


def test_synth_then_info_json(synth_tree):
    result = run_cli("info", synth_tree, "--json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [(r["modality"], r["patient"], r["sequence"]) for r in records] == [
        ("CT", "1", "CT"), ("CT", "2", "CT"),
        ("MR", "1", "T2SPIR"), ("MR", "1", "T1DUAL_InPhase"), ("MR", "1", "T1DUAL_OutPhase"),
        ("MR", "2", "T2SPIR"), ("MR", "2", "T1DUAL_InPhase"), ("MR", "2", "T1DUAL_OutPhase"),
    ]
    assert all(r["shape"] == [3, 32, 32] for r in records)
    assert all(len(r["spacing_mm"]) == 3 and min(r["spacing_mm"]) > 0 for r in records)
    # Label counts against the Ground PNGs read directly.
    gray = np.stack([np.asarray(Image.open(p)) for p in sorted((synth_tree / "MR/2/T2SPIR/Ground").iterdir())])
    expected = {"background": 0, "liver": 63, "right_kidney": 126, "left_kidney": 189, "spleen": 252}
    assert records[5]["label_voxels"] == {name: int((gray == value).sum()) for name, value in expected.items()}
    ct_gray = np.stack([np.asarray(Image.open(p)) for p in sorted((synth_tree / "CT/1/Ground").iterdir())])
    assert records[0]["label_voxels"]["liver"] == int(np.count_nonzero(ct_gray))
    assert "jax" not in result.stderr


def test_info_on_real_ct_sample(ct_sample_dir):
    result = run_cli("info", ct_sample_dir)
    assert result.returncode == 0, result.stderr
    header, row, count = result.stdout.strip().splitlines()
    assert header.split()[:4] == ["patient", "modality", "sequence", "shape"]
    assert "78 x 512 x 512" in row and "2 x 0.7265625 x 0.7265625" in row
    assert count == "1 case(s)"


def test_data_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "CT" / "4").mkdir(parents=True)
    result = run_cli("info", tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "CT/4/DICOM_anon" in result.stderr and "Traceback" not in result.stderr


def test_the_data_modules_do_not_import_jax():
    code = (
        "import sys, scse_jax.data.__main__, scse_jax.data.chaos, scse_jax.data.synthetic;"
        "sys.exit('jax' in sys.modules or 'nibabel' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    assert subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, timeout=60).returncode == 0


@pytest.mark.parametrize(
    "argv",
    [[], ["info"], ["frobnicate", "x"], ["info", "x", "--jsn"], ["synth", "out", "--size", "big"],
     ["synth", "out", "--size", "8"], ["synth", "out", "--modalities", "PET"],
     ["info", "x", "--sequences", "T3"]],
)
def test_usage_errors_exit_2(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bad_data_exit_1(synth_tree, tmp_path, capsys):
    assert main(["synth", str(synth_tree)]) == 1  # refuses to overwrite
    assert "refusing to overwrite" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "DICOM_anon").mkdir()
    (broken / "DICOM_anon" / "a.dcm").write_bytes(b"\0" * 10)
    assert main(["info", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "a.dcm: not a readable DICOM file" in err


def test_info_table_lists_each_case(synth_tree, capsys):
    assert main(["info", str(synth_tree), "--sequences", "CT", "T2SPIR"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 4 + 1
    assert lines[1].split()[:4] == ["1", "CT", "CT", "3"]
    assert "liver=" in lines[3] and "spleen=" in lines[3]
