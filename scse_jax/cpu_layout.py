"""How many JAX devices the CPU is split into: by default ("auto") one per physical core, as
many as divide the run's batches.

XLA:CPU runs one program at a time per device, and many of the U-Net's layers keep only part
of a multi-core CPU busy, so a batch split over one device per core runs faster than on one
device (measured in benchmarks/README.md). The count must be set before JAX starts its
backends; a count JAX was already given (JAX_NUM_CPU_DEVICES, jax_num_cpu_devices, XLA_FLAGS'
--xla_force_host_platform_device_count), a multi-process run, a non-CPU JAX_PLATFORMS and an
already started JAX are left as they are.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import jax

from scse_jax import sharding
from scse_jax.errors import ConfigError

AUTO = "auto"
_FORCED_COUNT_FLAG = "--xla_force_host_platform_device_count"

_applied: CpuLayout | None = None


@dataclasses.dataclass(frozen=True)
class CpuLayout:
    """The CPU device count chosen for this process, and why.

    Attributes:
      devices: the count given to JAX; None where JAX's own setting stands.
      reason: why, in words (for the start-up line).
    """

    devices: int | None
    reason: str

    def describe(self) -> str:
        if self.devices is None:
            return f"CPU layout left to JAX ({self.reason})"
        noun = "device" if self.devices == 1 else "devices"
        return f"CPU layout: {self.devices} JAX {noun} ({self.reason})"


def physical_cores() -> int:
    """The cores this process may run on, hyper-threads of one core counted once."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:  # no topology (not Linux): every logical CPU counts
            cores.add(str(cpu))
    return max(1, len(cores))


def largest_dividing_count(limit: int, batch_sizes: Sequence[int]) -> int:
    """The largest count in 1..limit that divides every batch size."""
    for count in range(max(1, limit), 0, -1):
        if all(size % count == 0 for size in batch_sizes):
            return count
    return 1


def parse_cpu_devices(value: str | int) -> int | None:
    """ "auto" -> None (one device per physical core); a positive integer -> that count."""
    text = str(value).strip().lower()
    if text == AUTO:
        return None
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ConfigError(f"the CPU device count must be {AUTO!r} or a positive integer, got {value!r}")
    return int(text)


def choose_layout(
    requested: int | None,
    batch_sizes: Sequence[int],
    *,
    cores: int,
    multi_process: bool = False,
    set_elsewhere: str | None = None,
) -> CpuLayout:
    """The layout for a request (None: auto), the run's batch sizes and the machine (pure).

    An explicit count is always taken; auto gives way to a count set elsewhere
    (`set_elsewhere` says where) and to a multi-process run, whose processes keep one device each.
    """
    if requested is not None:
        return CpuLayout(requested, "asked for")
    if set_elsewhere:
        return CpuLayout(None, set_elsewhere)
    if multi_process:
        return CpuLayout(None, "a multi-process run")
    count = largest_dividing_count(cores, batch_sizes)
    batches = " and ".join(str(size) for size in dict.fromkeys(batch_sizes))
    if count == cores:
        per_core = "one per physical core" if cores > 1 else "one physical core"
        return CpuLayout(count, f"auto: {per_core}")
    return CpuLayout(count, f"auto: the most devices up to the {cores} physical cores that divide batch {batches}")


def _backends_started() -> bool:
    # JAX has no public query for this; where its private one is missing, set_up finds out
    # when setting the count fails.
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def count_set_elsewhere() -> str | None:
    """Where this process's CPU device count is already decided, if anywhere."""
    if _backends_started():
        return "JAX has already started"
    if jax.config.jax_num_cpu_devices >= 0:
        return f"jax_num_cpu_devices / JAX_NUM_CPU_DEVICES is {jax.config.jax_num_cpu_devices}"
    if _FORCED_COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
        return f"XLA_FLAGS sets {_FORCED_COUNT_FLAG}"
    platforms = jax.config.jax_platforms or ""
    if platforms and "cpu" not in platforms.split(","):
        return f"JAX_PLATFORMS is {platforms}"
    return None


def set_up(requested: str | int = AUTO, batch_sizes: Sequence[int] = (), *, multi_process: bool = False) -> CpuLayout:
    """Chooses and applies this process's CPU layout (before JAX starts); returns it.

    `batch_sizes`: the global batches the devices must divide (none: any count divides).
    A call that applies nothing keeps an earlier call's record for `startup_note`, since
    that call decided the device count.
    """
    global _applied
    requested_count = parse_cpu_devices(requested)
    layout = choose_layout(
        requested_count,
        batch_sizes,
        cores=physical_cores(),
        multi_process=multi_process,
        set_elsewhere=count_set_elsewhere(),
    )
    if layout.devices is not None:
        try:
            sharding.use_cpu_devices(layout.devices)
        except ConfigError:
            if requested_count is not None:
                raise
            layout = CpuLayout(None, "JAX has already started")
    if layout.devices is not None or _applied is None:
        _applied = layout
    return layout


def startup_note() -> str:
    """The applied layout, for a run's start-up line on the CPU ("" elsewhere or when none was applied)."""
    if _applied is None or jax.default_backend() != "cpu":
        return ""
    return _applied.describe()


def devices_for_batch(batch_size: int) -> list[jax.Device]:
    """The devices a single-process CPU predictor uses: as many as divide its batch.

    Elsewhere (accelerators, several processes) every device, as before.
    """
    devices = jax.devices()
    if jax.process_count() > 1 or devices[0].platform != "cpu":
        return devices
    return devices[: largest_dividing_count(len(devices), [batch_size])]
