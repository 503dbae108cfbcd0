"""The CPU device layout: the count chosen for given cores and batches, what it gives way to,
and a plain launch that reports it."""

import os
import subprocess
import sys

import jax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scse_jax import cpu_layout, hugepages
from scse_jax.errors import ConfigError


@pytest.mark.parametrize(
    ("cores", "batches", "expected"),
    [
        (2, [20], 2),
        (2, [20, 20], 2),
        (4, [20], 4),
        (6, [20], 5),  # 6 does not divide 20
        (8, [20, 8], 4),  # train and eval batches both
        (16, [20], 10),
        (3, [7], 1),
        (1, [20], 1),
        (4, [], 4),  # no batch to divide
    ],
)
def test_auto_count_is_the_most_devices_up_to_the_cores_that_divide_every_batch(cores, batches, expected):
    layout = cpu_layout.choose_layout(None, batches, cores=cores)
    assert layout.devices == expected
    assert "auto" in layout.describe()


@settings(deadline=None, max_examples=200)
@given(cores=st.integers(1, 64), batches=st.lists(st.integers(1, 512), min_size=1, max_size=3))
def test_auto_count_divides_every_batch_and_no_larger_count_would(cores, batches):
    count = cpu_layout.choose_layout(None, batches, cores=cores).devices
    assert 1 <= count <= cores
    assert all(size % count == 0 for size in batches)
    assert not any(all(size % larger == 0 for size in batches) for larger in range(count + 1, cores + 1))


def test_the_start_up_line_says_why_the_count_is_below_the_cores():
    assert cpu_layout.choose_layout(None, [20], cores=2).describe() == "CPU layout: 2 JAX devices (auto: one per physical core)"
    assert "divide batch 20 and 8" in cpu_layout.choose_layout(None, [20, 8], cores=8).describe()
    assert cpu_layout.choose_layout(None, [20], cores=1).describe() == "CPU layout: 1 JAX device (auto: one physical core)"


def test_an_explicit_count_is_taken_and_auto_gives_way_to_jax_settings_and_multi_process_runs():
    assert cpu_layout.choose_layout(1, [20], cores=8).devices == 1
    assert cpu_layout.choose_layout(3, [20], cores=8, set_elsewhere="XLA_FLAGS").devices == 3
    elsewhere = cpu_layout.choose_layout(None, [20], cores=8, set_elsewhere="XLA_FLAGS sets it")
    assert elsewhere.devices is None and "XLA_FLAGS" in elsewhere.describe()
    assert cpu_layout.choose_layout(None, [20], cores=8, multi_process=True).devices is None


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", True, 0])
def test_a_count_is_auto_or_a_positive_integer(value):
    with pytest.raises(ConfigError, match="auto"):
        cpu_layout.parse_cpu_devices(value)


def test_counts_parse():
    assert cpu_layout.parse_cpu_devices("auto") is None
    assert cpu_layout.parse_cpu_devices("AUTO") is None
    assert cpu_layout.parse_cpu_devices("3") == 3
    assert cpu_layout.parse_cpu_devices(2) == 2


def test_physical_cores_are_at_most_the_cpus_this_process_may_use():
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= cpu_layout.physical_cores() <= usable


def test_in_a_started_jax_auto_changes_nothing():
    jax.devices()
    layout = cpu_layout.set_up("auto", [8])
    assert layout.devices is None and "already started" in layout.reason


def test_a_predictor_uses_as_many_cpu_devices_as_divide_its_batch():
    assert jax.device_count() == 8
    assert len(cpu_layout.devices_for_batch(8)) == 8
    assert len(cpu_layout.devices_for_batch(20)) == 5
    assert len(cpu_layout.devices_for_batch(7)) == 7


def _startup_layout(env: dict[str, str], *flags: str) -> tuple[int, str]:
    """The device count and layout line of a process that sets its layout as launch.py does."""
    code = (
        "import sys; from scse_jax import cpu_layout; import jax; "
        "layout = cpu_layout.set_up(*sys.argv[1:2] or ['auto'], [20]); "
        "print(jax.device_count()); print(cpu_layout.startup_note())"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, *flags], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    count, note = completed.stdout.strip().splitlines()
    return int(count), note


def _plain_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_a_plain_process_gets_the_auto_layout_and_one_device_when_asked():
    expected = cpu_layout.choose_layout(None, [20], cores=cpu_layout.physical_cores()).devices
    count, note = _startup_layout(_plain_env())
    assert count == expected and f"{expected} JAX device" in note and "auto" in note
    assert _startup_layout(_plain_env(), "1")[0] == 1
    pinned, note = _startup_layout({**_plain_env(), "JAX_NUM_CPU_DEVICES": "1"})
    assert pinned == 1 and "JAX_NUM_CPU_DEVICES" in note


def test_a_plain_launch_reports_its_auto_layout_in_the_start_up_line(tmp_path):
    from tests._launch import Run, launch_args, subprocess_env, write_tiny_tree

    env = subprocess_env()
    del env["JAX_NUM_CPU_DEVICES"]  # what a user's plain launch sees
    count = cpu_layout.choose_layout(None, [8, 8], cores=cpu_layout.physical_cores()).devices
    run = Run(launch_args(tmp_path / "run", write_tiny_tree(tmp_path / "chaos"), tmp_path / "cache"), env)
    try:
        run.wait_until(lambda: run.saw_line("Training on"), "the start-up line")
    finally:
        run.process.terminate()
        run.finish()
    (line,) = [line for line in run.stdout if line.startswith("Training on")]
    assert line.startswith(f"Training on {count} cpu device(s) in 1 process(es), global batch 8; CPU layout: {count} JAX "), line
    assert "(auto: " in line, line
    restarted = hugepages.wanted({}, hugepages.glibc_version())  # launch.py restarts with huge pages
    assert line.endswith("; malloc on huge pages") == restarted, line


def test_auto_leaves_a_started_jax_alone_where_the_started_check_cannot_tell(monkeypatch):
    jax.devices()  # JAX has started in this process
    monkeypatch.setattr(cpu_layout, "_applied", cpu_layout._applied)  # restored afterwards for other tests
    monkeypatch.setattr(cpu_layout, "count_set_elsewhere", lambda: None)  # as if JAX's private check were missing
    monkeypatch.setattr(cpu_layout, "physical_cores", lambda: 2)
    layout = cpu_layout.set_up("auto", [20])
    assert layout.devices is None and "already started" in layout.describe()
    with pytest.raises(ConfigError, match="after JAX has started"):
        cpu_layout.set_up("3", [])


def test_a_later_call_that_applies_nothing_keeps_the_start_up_note(monkeypatch):
    jax.devices()  # JAX has started in this process
    monkeypatch.setattr(cpu_layout, "_applied", cpu_layout.CpuLayout(8, "asked for"))
    layout = cpu_layout.set_up("auto", [8])
    assert layout.devices is None and "already started" in layout.reason
    assert cpu_layout.startup_note() == "CPU layout: 8 JAX devices (asked for)"
