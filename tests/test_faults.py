"""Faults of real runs: SIGKILL mid-step, mid-evaluation and mid-save, SIGTERM/SIGINT, a non-finite
loss, a failed save. Every run is a real ``python launch.py`` subprocess on tiny synthetic data.

One uninterrupted reference run and one run interrupted five times in the same workdir are shared
by the tests (module fixtures), so the file costs about seven short training processes.
"""

import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from tests._launch import (
    REPO,
    STEPS_PER_EPOCH,
    Run,
    complete_steps,
    launch_args,
    paused_at,
    read_metrics,
    restore_state,
    run_to_end,
    subprocess_env,
    temporary_folders,
    write_tiny_tree,
)

EPOCHS = 4
LAST_STEP = EPOCHS * STEPS_PER_EPOCH
EVERY_EPOCH = [(split, epoch) for epoch in range(1, EPOCHS + 1) for split in ("train", "val")]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return write_tiny_tree(root / "chaos"), root / "cache"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run of EPOCHS epochs."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    run = run_to_end(launch_args(workdir, *data, f"--config.train.num_epochs={EPOCHS}"))
    assert run.process.returncode == 0, run.output
    return workdir


@pytest.fixture(scope="module")
def interrupted(data, tmp_path_factory):
    """The same run, interrupted five times in one workdir and restarted each time.

    Returns the workdir and, per attempt, what was seen: the run, the latest complete checkpoint
    before it started, and facts about the moment it was stopped.
    """
    workdir = tmp_path_factory.mktemp("interrupted") / "run"
    ckpt_dir = workdir / "checkpoints"
    args = launch_args(workdir, *data, f"--config.train.num_epochs={EPOCHS}")
    attempts = {}

    def start(name, pause_at=None):
        steps = complete_steps(ckpt_dir)
        marker = workdir.parent / f"{name}.paused"
        run = Run(paused_at(pause_at, marker, args) if pause_at else args)
        attempts[name] = {"resumed_from": steps[-1] if steps else None, "run": run}
        if pause_at:  # the kill lands exactly there, however loaded the machine
            run.wait_until(marker.exists, f"the run stopped at {pause_at}")
        return run

    # 1. SIGKILL while orbax writes the checkpoint of epoch 2 (epoch 1's is complete).
    run = start("mid_save", pause_at="save:4")
    run.process.kill()
    run.finish()
    attempts["mid_save"]["left_behind"] = temporary_folders(ckpt_dir)
    attempts["mid_save"]["steps_after"] = complete_steps(ckpt_dir)

    # 2. SIGTERM in epoch 2, right after step 3 reported its loss.
    run = start("sigterm")
    run.wait_until(lambda: run.saw_line(f"step 3/{LAST_STEP}"), "step 3")
    run.process.send_signal(signal.SIGTERM)
    run.finish()

    # 3. SIGKILL during the validation of epoch 3 (its train record is written, its val record not).
    run = start("mid_eval", pause_at="eval:3")
    run.process.kill()
    run.finish()
    attempts["mid_eval"]["records_at_kill"] = read_metrics(workdir)

    # 4. SIGINT in epoch 3, right after step 5.
    run = start("sigint")
    run.wait_until(lambda: run.saw_line(f"step 5/{LAST_STEP}"), "step 5")
    run.process.send_signal(signal.SIGINT)
    run.finish()

    # 5. SIGKILL in the middle of epoch 4's steps.
    run = start("mid_step", pause_at="step:7")
    run.process.kill()
    run.finish()
    attempts["mid_step"]["steps_after"] = complete_steps(ckpt_dir)

    # 6. Restart and finish.
    run = start("final")
    run.finish()
    return workdir, attempts


def test_sigkill_mid_save_leaves_nothing_trusted(interrupted):
    _, attempts = interrupted
    mid_save = attempts["mid_save"]
    assert mid_save["run"].process.returncode == -signal.SIGKILL
    # The kill hit while checkpoint 4 was still a temporary folder: it never became a step.
    assert any(name.startswith("4.") for name in mid_save["left_behind"])
    assert 4 not in mid_save["steps_after"] and 2 in mid_save["steps_after"]
    assert attempts["sigterm"]["resumed_from"] == 2
    assert "Resuming from step 2" in "\n".join(attempts["sigterm"]["run"].stdout)


@pytest.mark.parametrize("name, sig", [("sigterm", "SIGTERM"), ("sigint", "SIGINT")])
def test_stop_signals_finish_the_step_save_and_exit_zero(interrupted, name, sig):
    workdir, attempts = interrupted
    run = attempts[name]["run"]
    assert run.process.returncode == 0, run.output
    lines = [line for line in run.stdout if line.startswith(f"{sig} received: saved step ")]
    assert len(lines) == 1, run.output
    saved_step = int(lines[0].split("saved step ")[1].split()[0])
    assert f"Resume with the same command and --workdir={workdir}" in lines[0]
    assert "Traceback" not in "\n".join(run.stderr)
    # The step that was running when the signal came finished and is the one saved.
    last_reported = max(int(l.split(" step ")[1].split("/")[0]) for l in run.stdout if " step " in l and "img/s" in l)
    assert saved_step == last_reported
    next_attempt = list(attempts)[list(attempts).index(name) + 1]
    assert attempts[next_attempt]["resumed_from"] == saved_step
    assert f"Resuming from step {saved_step}" in "\n".join(attempts[next_attempt]["run"].stdout)


def test_sigkill_mid_eval_and_mid_step_resume_from_the_last_complete_checkpoint(interrupted):
    _, attempts = interrupted
    assert attempts["mid_eval"]["run"].process.returncode == -signal.SIGKILL
    assert attempts["mid_step"]["run"].process.returncode == -signal.SIGKILL
    seen = [(r["split"], r["epoch"]) for r in attempts["mid_eval"]["records_at_kill"]]
    assert ("train", 3) in seen and ("val", 3) not in seen
    # Epoch 3's checkpoint (step 6) was never written, so the next start went back to before it.
    assert attempts["sigint"]["resumed_from"] < 3 * STEPS_PER_EPOCH
    assert attempts["final"]["resumed_from"] == max(attempts["mid_step"]["steps_after"])
    assert attempts["final"]["resumed_from"] < LAST_STEP


def test_interrupted_run_logs_every_epoch_exactly_once(interrupted, reference):
    workdir, attempts = interrupted
    assert attempts["final"]["run"].process.returncode == 0, attempts["final"]["run"].output
    records = read_metrics(workdir)
    assert [(r["split"], r["epoch"]) for r in records] == EVERY_EPOCH
    expected = read_metrics(reference)
    for name in ("loss", "cross_entropy", "dice_loss", "dice_mean"):
        assert [r.get(name) for r in records] == [r.get(name) for r in expected], name
    assert temporary_folders(workdir / "checkpoints") == []


def test_interrupted_run_ends_bit_identical_to_uninterrupted(interrupted, reference):
    """Same seed, same CPU, same one-device programs: every step sees the same batch (the
    order and augmentation are seeded per (epoch, step)) and the same state, so equality is exact."""
    workdir, _ = interrupted
    resumed, straight = restore_state(workdir, LAST_STEP), restore_state(reference, LAST_STEP)
    assert int(resumed.step) == LAST_STEP
    leaves = jax.tree.leaves_with_path(straight)
    assert len(leaves) == len(jax.tree.leaves(resumed)) > 10
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), straight, resumed)


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(reference, data, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    before = read_metrics(workdir)
    run = run_to_end(
        launch_args(workdir, *data, f"--config.train.num_epochs={EPOCHS + 1}", "--config.train.learning_rate=1e30")
    )
    assert run.process.returncode == 1, run.output
    assert not any("Traceback" in line for line in run.stderr), run.output
    errors = [line for line in run.stderr if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: non-finite loss"), run.output
    failed_step = int(errors[0].split(" at step ")[1].split(";")[0])
    assert LAST_STEP < failed_step <= LAST_STEP + STEPS_PER_EPOCH
    assert complete_steps(workdir / "checkpoints")[-1] == LAST_STEP
    assert read_metrics(workdir) == before


FAILED_SAVE = textwrap.dedent(
    """
    import json, resource, signal, sys
    import numpy as np
    from scse_jax.checkpoint import Checkpoints
    from scse_jax.errors import CheckpointError

    directory = sys.argv[1]
    state = {"w": np.arange(300_000, dtype=np.float32)}
    meta = {"step": 1, "config": {}, "val_dice": 0.5}
    ckpts = Checkpoints(directory)
    ckpts.save(1, state, meta)
    # A full disk, as root can feel it: writes past 64 KiB fail with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
    try:
        ckpts.save(2, {"w": state["w"] + 1}, {**meta, "step": 2})
        print("SAVED")
    except CheckpointError as error:
        print("CheckpointError:", error)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    """
)


def test_failed_save_is_a_checkpoint_error_and_keeps_the_previous_one(tmp_path):
    directory = tmp_path / "checkpoints"
    done = subprocess.run(
        [sys.executable, "-c", FAILED_SAVE, str(directory)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CheckpointError: saving checkpoint 2 under" in done.stdout, done.stdout + done.stderr
    assert "previous checkpoints are untouched" in done.stdout
    assert complete_steps(directory) == [1]

    from scse_jax.checkpoint import Checkpoints

    ckpts = Checkpoints(directory)  # reopening also clears the failed save's temporary folder
    try:
        assert ckpts.latest_step() == 1
        abstract = {"w": jax.ShapeDtypeStruct((300_000,), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
        state, meta = ckpts.restore(1, abstract)
    finally:
        ckpts.close()
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(300_000, dtype=np.float32))
    assert meta["step"] == 1
    # orbax clears it in a thread started on opening, which close() does not wait for
    deadline = time.monotonic() + 60
    while temporary_folders(directory) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert temporary_folders(directory) == []


FULL_DISK_WRITES = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    import ml_collections
    from scse_jax import train
    from scse_jax.errors import OutputError
    from scse_jax.run_log import RunLog

    workdir = Path(sys.argv[1])
    log = RunLog(workdir)
    log.record("train", 1, 2, {"loss": 0.5, "note": "x" * 1000})
    (workdir / "config.json").write_text("{}")  # a previous start's
    limit = (workdir / "metrics.jsonl").stat().st_size + 100
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # a full disk, as root feels it
    writes = {
        "config": lambda: train._save_config(ml_collections.ConfigDict({"note": "y" * 2000}), workdir),
        "metrics": lambda: log.record("val", 1, 2, {"dice": 0.25, "note": "z" * 1000}),
    }
    for name, write in writes.items():
        try:
            write()
            print(name, "written")
        except OutputError as error:
            print(name, "OutputError:", error)
        except OSError as error:
            print(name, "OSError:", error)
    """
)


def test_a_full_disk_leaves_config_and_metrics_whole_with_one_line(tmp_path):
    """At the start (config.json) and while metrics.jsonl grows: the old content stays, no
    temporary file, no cut line, and a package error (launch.py's one line)."""
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_WRITES, str(tmp_path)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("config.json", "metrics.jsonl"):
        error = f"OutputError: cannot write {tmp_path / name} (File too large); what was there is unchanged"
        assert error in done.stdout, done.stdout
    assert (tmp_path / "config.json").read_text() == "{}"
    assert [(r["split"], r["epoch"]) for r in read_metrics(tmp_path)] == [("train", 1)]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")  # no cut line after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl", "tensorboard"]
