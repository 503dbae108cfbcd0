"""A real two-process run on the CPU: two ``launch.py`` processes on 127.0.0.1, started as the
README's multi-host section starts them, on tiny synthetic data.

One workdir sees three pairs: the first loses process 1 (killed) in epoch 2, the second loses
process 0 (killed, and with it the coordination service) as it starts, the third resumes and
finishes. A one-process run of the same global batch, beside the first pair, is the reference.
Quick tests of the multi-process plumbing in `scse_jax.sharding` follow.
"""

import json
import signal
import socket
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from scse_jax import sharding
from tests._launch import (
    REPO,
    Run,
    complete_steps,
    launch_args,
    read_metrics,
    temporary_folders,
    write_tiny_tree,
)

EPOCHS = 2
CONFIG = "configs/mr_scse.py"
KILL_NOTICE_S = 60  # a dead peer is seen at the next collective, or at JAX's heartbeat timeout (100 s)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_pair(workdir, data) -> list[Run]:
    """Processes 0 and 1 of one run, as the README's multi-host section starts them."""
    port = free_port()
    return [
        Run(launch_args(
            workdir, *data, f"--config.train.num_epochs={EPOCHS}",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}",
            config=CONFIG,
        ))  # fmt: skip
        for process_id in (0, 1)
    ]


def kill_when(victim: Run, survivor: Run, text: str) -> dict:
    """Kills `victim` once `survivor` printed a line with `text`; what the survivor did next."""
    survivor.wait_until(
        lambda: any(text in line for line in survivor.stdout + survivor.stderr), text, timeout=300, interval=0.05
    )
    victim.process.kill()
    killed = time.monotonic()
    code = survivor.finish(timeout=KILL_NOTICE_S + 60)
    victim.finish()
    return {"code": code, "seconds": time.monotonic() - killed, "stderr": survivor.stderr, "run": survivor}


def val_records(workdir) -> list[dict]:
    return [record for record in read_metrics(workdir) if record["split"] == "val"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    data = write_tiny_tree(root / "chaos"), root / "cache"
    workdir = root / "two" / "run"
    started = time.monotonic()
    reference = Run(launch_args(root / "one" / "run", *data, f"--config.train.num_epochs={EPOCHS}", config=CONFIG))
    everything = [reference]
    try:
        everything += (first := start_pair(workdir, data))
        lost_1 = kill_when(first[1], first[0], f"epoch 2/{EPOCHS} step 3/")
        everything += (second := start_pair(workdir, data))
        lost_0 = kill_when(second[0], second[1], "class weights (")  # past jax.distributed's start
        everything += (final := start_pair(workdir, data))
        for run in (reference, *final):
            run.finish()
    finally:
        for run in everything:
            if run.process.poll() is None:
                run.process.kill()
    print(f"{time.monotonic() - started:.0f} s for 7 launches")
    for process_id, run in enumerate(final):
        print(f"process {process_id}: {run.stdout[-1]!r}")
    print(f"process 0 after process 1 was killed ({lost_1['seconds']:.1f} s): {lost_1['stderr'][-1]!r}")
    print(f"process 1 after process 0 was killed ({lost_0['seconds']:.1f} s): {lost_0['stderr'][-1]!r}")
    for multi, single in zip(val_records(workdir), val_records(root / "one" / "run")):
        print(f"epoch {multi['epoch']} validation Dice: two processes {multi['dice_mean']!r}, one {single['dice_mean']!r}")
    return {"reference": root / "one" / "run", "workdir": workdir, "final": final, "lost_1": lost_1, "lost_0": lost_0}


@pytest.mark.slow
def test_the_resumed_pair_ends_one_run_with_one_record_per_epoch_and_one_checkpoint_series(runs):
    workdir = runs["workdir"]
    for run in runs["final"]:
        assert run.process.returncode == 0, run.output
        assert f"Resuming from step 2 (epoch 1) in {workdir / 'checkpoints'}" in run.stdout, run.output
        assert run.stdout[-1].startswith("mean "), run.output  # the last row of the Dice table
    records = read_metrics(workdir)
    assert [(r["split"], r["epoch"]) for r in records] == [
        (split, epoch) for epoch in range(1, EPOCHS + 1) for split in ("train", "val")
    ]
    assert sorted(path.relative_to(workdir.parent) for path in workdir.parent.rglob("metrics.jsonl")) == [
        workdir.relative_to(workdir.parent) / "metrics.jsonl"
    ]
    assert complete_steps(workdir / "checkpoints") == [2, 2 * EPOCHS]
    assert temporary_folders(workdir / "checkpoints") == []
    assert sorted(path.name for path in workdir.parent.rglob("checkpoints")) == ["checkpoints"]


@pytest.mark.slow
def test_both_processes_end_with_the_same_parameters(runs):
    meta = json.loads((runs["workdir"] / "checkpoints" / str(2 * EPOCHS) / "meta" / "metadata").read_text())
    digests = meta["state_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests


@pytest.mark.slow
def test_two_processes_validate_as_one_process_with_the_same_global_batch(runs):
    two, one = val_records(runs["workdir"]), val_records(runs["reference"])
    assert [r["epoch"] for r in two] == [r["epoch"] for r in one] == list(range(1, EPOCHS + 1))
    # The pair sums its gradients in another order (gloo's all-reduce), so its parameters differ
    # from the single process's in their last bits: the validation loss agrees to 1e-4, but the
    # thresholded masks of a barely trained model can flip a few pixels (seen on a 2-core EPYC),
    # so the Dice is compared to 1e-3.
    for multi, single in zip(two, one):
        assert multi["loss"] == pytest.approx(single["loss"], rel=1e-4)
        assert multi["dice_mean"] == pytest.approx(single["dice_mean"], abs=1e-3)
        assert multi["dice"] == pytest.approx(single["dice"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(
    "lost, last_line",
    [
        ("lost_1", "error: lost contact with another process of the run (UNKNOWN: Gloo"),
        ("lost_0", "error: this process of the run ended abnormally (JAX's distributed runtime aborted it"),
    ],
    ids=["process 1 killed mid-epoch", "process 0 killed at start"],
)
def test_a_killed_process_ends_the_other_soon_with_one_clear_last_line(runs, lost, last_line):
    survivor = runs[lost]
    assert survivor["code"] == 1, survivor["run"].output
    assert survivor["seconds"] < KILL_NOTICE_S, survivor["run"].output
    assert survivor["stderr"][-1].startswith(last_line), survivor["run"].output
    assert "resume from the latest checkpoint" in survivor["stderr"][-1]
    if lost == "lost_1":  # a collective failed in Python: nothing but the line
        assert not any("stack trace" in line or "Fatal Python error" in line for line in survivor["stderr"])


def test_the_readme_shows_the_command_of_this_test():
    readme = (REPO / "README.md").read_text()
    for part in (
        f"python launch.py --config {CONFIG}",
        "--config.distributed.coordinator_address=127.0.0.1:",
        "--config.distributed.num_processes=2 --config.distributed.process_id=$RANK",
    ):
        assert part in readme


@pytest.mark.parametrize(
    "address, processes, process_id, expected",
    [("", 0, -1, False), ("", 1, 0, False), ("h:1", 2, 0, True), ("", 2, 1, True), ("h:1", 0, -1, True)],
)
def test_a_run_is_multi_process_when_its_config_says_so(monkeypatch, address, processes, process_id, expected):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    distributed = ml_collections.ConfigDict(
        {"coordinator_address": address, "num_processes": processes, "process_id": process_id}
    )
    assert sharding.is_multi_process(distributed) is expected


def test_process_digests_tell_copies_apart():
    tree = {"w": jax.numpy.arange(6.0), "b": np.zeros(2, np.float32)}
    assert sharding.process_digests(tree) == sharding.process_digests(jax.tree.map(np.array, tree))
    assert sharding.process_digests(tree) != sharding.process_digests({**tree, "b": np.ones(2, np.float32)})
    assert sharding.on_every_process(True) and not sharding.on_every_process(False)


@pytest.mark.parametrize(
    "code, status, last_line",
    [
        ("raise SystemExit(3)", 3, None),
        ("import os; os.abort()", 1, "error: this process of the run ended abnormally (JAX's distributed runtime"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 1, "error: this process of the run ended "
         "abnormally (it was killed by SIGKILL)"),
        ("import os, signal, sys; print('F client.h:80] Terminating process because the JAX distributed service "
         "detected fatal errors.', file=sys.stderr, flush=True); os.kill(os.getpid(), signal.SIGSEGV)", 1,
         "error: this process of the run ended abnormally (JAX's distributed runtime"),
    ],
)  # fmt: skip
def test_the_supervising_parent_passes_statuses_on_and_reports_a_killed_child(capfd, code, status, last_line):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert sharding.supervise([sys.executable, "-c", code]) == status
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    lines = capfd.readouterr().err.splitlines()
    if last_line:
        assert lines[-1].startswith(last_line), lines


def test_the_supervising_parent_passes_the_childs_stderr_on(capfd):
    code = "import sys, time; print('first', file=sys.stderr, flush=True); time.sleep(0.2); sys.exit('second')"
    assert sharding.supervise([sys.executable, "-c", code]) == 1
    assert capfd.readouterr().err.splitlines() == ["first", "second"]


def test_failures_of_a_single_process_run_pass_through_untouched():
    with pytest.raises(ValueError, match="boom"), sharding.exit_at_once_on_failure():
        raise ValueError("boom")
    with pytest.raises(SystemExit), sharding.exit_at_once_on_failure():
        sys.exit(1)
