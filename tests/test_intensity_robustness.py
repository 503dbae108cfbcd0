"""benchmarks/intensity_robustness.py: a trained run's Dice on its test patients under grey-level gammas."""

import importlib.util
import json

import numpy as np
import pytest

from tests._launch import REPO


@pytest.fixture(scope="module")
def robustness():
    spec = importlib.util.spec_from_file_location("intensity_robustness", REPO / "benchmarks/intensity_robustness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_remap_is_monotone_keeps_the_range_and_gamma_one_is_identity(robustness):
    voxels = np.random.default_rng(0).uniform(0, 1400, (3, 8, 8))
    np.testing.assert_allclose(robustness.remap(voxels, 1.0), voxels, rtol=1e-6)
    for gamma in (0.5, 2.0):
        out = robustness.remap(voxels, gamma)
        order = np.argsort(voxels.ravel())
        assert np.all(np.diff(out.ravel()[order]) >= 0)
        assert out.max() == pytest.approx(voxels.max(), rel=1e-6) and out.min() >= 0
    # gamma 2 darkens the mid-tones relative to the brightest voxel, so z-scoring cannot undo it.
    mid = voxels == np.median(voxels)
    assert np.all(robustness.remap(voxels, 2.0)[mid] < voxels[mid])


def test_robustness_of_a_trained_run_is_its_dice_at_gamma_one(robustness, tiny_trained_run, tmp_path):
    workdir, _, _ = tiny_trained_run
    out = tmp_path / "robust.json"
    assert robustness.main([str(workdir), "--json", str(out), "--gammas", "1,2"]) == 0
    result = json.loads(out.read_text())
    assert result["gammas"] == [1.0, 2.0]
    (run,) = result["runs"]
    assert set(run["dice"]) == {"1", "2"}
    for by_organ in run["dice"].values():
        organs = [by_organ[o] for o in ("liver", "right_kidney", "left_kidney", "spleen")]
        assert all(0.0 <= d <= 1.0 for d in organs)
        assert by_organ["mean"] == pytest.approx(np.mean(organs))
    from scse_jax import evaluate

    rows, _, _, _ = evaluate.score_checkpoint(workdir, split="test", which="best")
    expected = np.mean([row["dice"] for row in rows])
    assert run["dice"]["1"]["mean"] == pytest.approx(expected, abs=1e-6)


def test_bad_gammas_are_refused(robustness, tmp_path, capsys):
    assert robustness.main([str(tmp_path), "--json", str(tmp_path / "x.json"), "--gammas", "0,1"]) == 2
    assert "--gammas" in capsys.readouterr().err
