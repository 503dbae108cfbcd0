"""Malloc huge pages: when a process restarts for them, and that the restart keeps its PID,
its arguments and the tunables it had, once."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scse_jax import hugepages

GLIBC = (2, 36)


def test_wanted_on_a_recent_glibc_unless_set_or_refused():
    assert hugepages.wanted({}, GLIBC)
    assert hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC)
    assert hugepages.wanted({hugepages.PLAIN_MALLOC: "0"}, GLIBC)
    assert not hugepages.wanted({}, None)  # not glibc (macOS, musl)
    assert not hugepages.wanted({}, (2, 31))  # no such tunable yet
    assert not hugepages.wanted(hugepages.restart_environment({}), GLIBC)  # restarted already
    assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC)  # the user's own choice
    assert not hugepages.wanted({hugepages.PLAIN_MALLOC: "yes"}, GLIBC)


def test_the_restart_environment_keeps_the_tunables_already_there():
    env = hugepages.restart_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{hugepages.TUNABLE}"
    assert env["HOME"] == "/h"
    assert hugepages.restart_environment({})["GLIBC_TUNABLES"] == hugepages.TUNABLE


@pytest.mark.parametrize(
    "arguments, entry, expected",
    [
        (["launch.py", "--config", "c.py"], "launch.py", True),
        (["-u", "./launch.py"], "launch.py", True),
        (["-X", "importtime", "/repo/launch.py"], "launch.py", True),
        (["-m", "scse_jax.experiment", "--out", "x"], "scse_jax.experiment", True),
        (["-m", "tests._pause", "step:1", "m", "launch.py"], "launch.py", False),  # a harness running it inside
        (["-m", "ipykernel_launcher", "-f", "k.json"], "launch.py", False),  # a notebook's %run
        (["-m", "pdb", "launch.py"], "launch.py", False),
        (["-c", "import launch"], "launch.py", False),
        ([], "launch.py", False),
    ],
)
def test_only_a_process_started_as_the_entry_restarts(arguments, entry, expected):
    assert hugepages.started_as(entry, arguments) is expected


SCRIPT = textwrap.dedent(
    """
    import os, sys
    print("start", os.getpid(), sys.argv[1:], os.environ.get("GLIBC_TUNABLES", ""), flush=True)
    from scse_jax import hugepages
    hugepages.restart_with_hugepages("restart.py")
    print("running", hugepages.startup_note(), flush=True)
    """
)


def run_script(tmp_path, **extra_env):
    script = tmp_path / "restart.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.PLAIN_MALLOC)}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), **extra_env)
    done = subprocess.run([sys.executable, str(script), "a", "--b=1"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.skipif(not hugepages.wanted({}, hugepages.glibc_version()), reason="needs glibc 2.35 or newer")
def test_a_process_restarts_once_with_the_same_pid_and_arguments(tmp_path):
    first, second, running = run_script(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert first.split()[:2] == second.split()[:2]  # the same PID: exec, not a child
    assert "['a', '--b=1']" in first and "['a', '--b=1']" in second
    assert first.endswith("glibc.malloc.arena_max=2")
    assert second.endswith(f"glibc.malloc.arena_max=2:{hugepages.TUNABLE}")
    assert running == "running malloc on huge pages"


def test_plain_malloc_is_kept_when_asked(tmp_path):
    lines = run_script(tmp_path, **{hugepages.PLAIN_MALLOC: "1"})
    assert len(lines) == 2 and lines[1].strip() == "running"
