"""launch.py keeps compiled steps beside the prepared data, so that a repeated run compiles nothing;
one process at a time trains in a workdir."""

import json
import os
import socket
import subprocess
import sys

import pytest

from scse_jax import files
from scse_jax.errors import ConfigError
from scse_jax.run_log import RunLog
from tests._launch import REPO, launch_args, run_to_end, subprocess_env, write_tiny_tree


def test_a_repeated_run_finds_every_compiled_program_in_the_cache(tmp_path):
    data_root = write_tiny_tree(tmp_path / "chaos")
    cache_dir = tmp_path / "cache"
    env = subprocess_env()
    del env["JAX_COMPILATION_CACHE_DIR"]  # launch.py's own choice: <data.cache_dir>/xla

    def entries():  # compiled programs and when they were written (a hit only touches "-atime" files)
        return {p.name: p.stat().st_mtime_ns for p in (cache_dir / "xla").iterdir() if not p.name.endswith("-atime")}

    first = run_to_end(launch_args(tmp_path / "run1", data_root, cache_dir), env)
    assert first.process.returncode == 0, first.output
    after_first = entries()
    assert any("train_step" in name for name in after_first), after_first
    second = run_to_end(launch_args(tmp_path / "run2", data_root, cache_dir), env)
    assert second.process.returncode == 0, second.output
    assert entries() == after_first  # nothing compiled or written again


def test_cpu_devices_flag_splits_the_cpu_and_is_checked_against_the_batch(tmp_path):
    data_root = write_tiny_tree(tmp_path / "chaos")
    two = run_to_end(launch_args(tmp_path / "two", data_root, tmp_path / "cache", "--cpu_devices=2"), subprocess_env())
    assert two.process.returncode == 0, two.output
    start = "Training on 2 cpu device(s) in 1 process(es), global batch 8; CPU layout: 2 JAX devices (asked for)"
    assert any(line.startswith(start) for line in two.stdout), two.output  # then "; malloc on huge pages" on glibc
    three = run_to_end(launch_args(tmp_path / "three", data_root, tmp_path / "cache", "--cpu_devices=3"), subprocess_env())
    assert three.process.returncode == 1
    assert three.stderr[-1] == (
        "error: config.train.batch_size: 8 must be a positive multiple of the device count (3)"
    ), three.output


def test_a_second_launch_on_a_busy_workdir_is_one_line_naming_the_holder(tmp_path):
    data_root = write_tiny_tree(tmp_path / "chaos")
    workdir = tmp_path / "run"
    workdir.mkdir()
    with files.WorkdirLock(workdir):  # as a launch training there holds it
        second = run_to_end(launch_args(workdir, data_root, tmp_path / "cache"))
    assert second.process.returncode == 1, second.output
    assert not any("Traceback" in line for line in second.stderr), second.output
    (error,) = [line for line in second.stderr if line.startswith("error:")]
    holder = f"pid {os.getpid()} on {socket.gethostname()} since "
    assert error.startswith(f"error: --workdir {workdir} is in use by {holder}"), error
    assert error.endswith("; wait for it to end or use another --workdir"), error
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]  # nothing written: no metrics, no checkpoints


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from scse_jax.files import WorkdirLock; "
         "lock = WorkdirLock(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError, match=f"is in use by pid {holder.pid} on "):
            files.WorkdirLock(tmp_path)
        with files.WorkdirLock(tmp_path, process=1):  # process 1 of a multi-process run: its own lock
            pass
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid} " in (tmp_path / ".lock").read_text()  # the killed holder's record is left
    with files.WorkdirLock(tmp_path) as lock:
        assert lock.path.read_text().startswith(f"pid {os.getpid()} ")
    assert lock.path.read_text() == ""  # released: no holder named


def test_a_restart_keeps_one_record_per_epoch_of_a_log_with_repeats(tmp_path):
    """What two runs sharing a workdir used to leave (the lock now prevents it): the later
    record of each (split, epoch) stays, in the order of the first."""
    records = [("train", 1, 0.9), ("val", 1, 0.8), ("train", 1, 0.7), ("val", 1, 0.6), ("train", 2, 0.5)]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"split": split, "epoch": epoch, "loss": loss}) + "\n" for split, epoch, loss in records)
    )
    log = RunLog(tmp_path)
    log.roll_back_to(1)
    log.close()
    assert [(r["split"], r["epoch"], r["loss"]) for r in log.read_records()] == [("train", 1, 0.7), ("val", 1, 0.6)]


def test_without_a_workdir_the_run_goes_to_runs_config_name_and_the_same_command_resumes_it(tmp_path):
    data_root = write_tiny_tree(tmp_path / "chaos")
    args = [arg for arg in launch_args(tmp_path, data_root, tmp_path / "cache") if not arg.startswith("--workdir")]
    args[1] = str(REPO / "launch.py")
    args[args.index("configs/default.py")] = str(REPO / "configs" / "default.py")
    args.append("--config.train.num_epochs=1")
    here = tmp_path / "here"
    here.mkdir()

    def launch():
        return subprocess.run(args, cwd=here, env=subprocess_env(), capture_output=True, text=True, timeout=600)

    first = launch()
    assert first.returncode == 0, first.stdout + first.stderr
    assert sorted(p.name for p in (here / "runs").iterdir()) == ["default"]
    assert (here / "runs" / "default" / "metrics.jsonl").exists()
    second = launch()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Resuming from step" in second.stdout
    assert sorted(p.name for p in (here / "runs").iterdir()) == ["default"]
