"""benchmarks/quickstart.py times the README's first command as a first run and reads its final Dice."""

import json
import subprocess
import sys

from tests._launch import REPO, subprocess_env

TINY = (
    "--config.data.synthetic_patients=5", "--config.data.synthetic_size=32", "--config.data.synthetic_slices=8",
    "--config.data.image_size=32", "--config.data.num_folds=4", "--config.model.features=4",
    "--config.train.num_epochs=1", "--config.eval.num_overlays=0",
)  # fmt: skip


def test_the_quickstart_timing_records_each_first_run_and_its_final_validation(tmp_path):
    out = tmp_path / "quickstart.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/quickstart.py", "--json", str(out), "--seeds", "3", "--", *TINY],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert [run["seed"] for run in result["runs"]] == [3]
    for run in result["runs"]:
        assert run["wall_s"] > 0 and run["epoch"] == 1
        assert set(run["dice"]) == {"liver", "right_kidney", "left_kidney", "spleen"}
        assert 0.0 <= run["dice_mean"] <= 1.0
        assert run["dice_mean"] == sum(run["dice"].values()) / 4
    assert result["min_dice_mean"] == min(run["dice_mean"] for run in result["runs"])
    assert "seed 3:" in done.stdout and "final validation mean Dice" in done.stdout


def test_the_quickstart_timing_refuses_to_overwrite_a_folder(tmp_path):
    done = subprocess.run(
        [sys.executable, "benchmarks/quickstart.py", "--json", str(tmp_path), "--", *TINY],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "error" in done.stderr.lower()
