"""How the jitted steps compile: XLA options, the persistent compile cache, and whether a
compiled step's temporaries fit in the device's memory."""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import ml_collections

from scse_jax import sharding

# Share of the memory the train step's temporaries may take; the rest holds the data, the
# state and everything else the process keeps.
STEP_MEMORY_SHARE = 0.75


def step_compiler_options() -> dict[str, Any] | None:
    """XLA options for the jitted steps: LLVM -O1 on the CPU.

    The convolutions and products run in library calls, so LLVM's -O2 only optimises the
    elementwise fusions, where it buys no step time and costs compile time (see
    benchmarks/README.md). Left alone under jax_disable_most_optimizations, which asks for less.
    """
    if jax.default_backend() != "cpu" or jax.config.read("jax_disable_most_optimizations"):
        return None
    return {"xla_backend_optimization_level": 1}


def use_compilation_cache(data_config: ml_collections.ConfigDict) -> None:
    """Keeps compiled steps beside the prepared data, so that a resumed or repeated run skips
    compiling (unless JAX_COMPILATION_CACHE_DIR names another place)."""
    from scse_jax.data.run_data import cache_root

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(cache_root(data_config) / "xla"))


def memory_budget_bytes(device: jax.Device) -> int | None:
    """What one device's program may use: the accelerator's limit, or the host's memory shared
    by its CPU devices (None where unknown). `device` must be one of this process's own: no
    process can ask about another's."""
    if device.process_index != jax.process_index():
        raise ValueError(f"{device} belongs to process {device.process_index}, not this one ({jax.process_index()})")
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu" and hasattr(os, "sysconf"):
        try:
            physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
        return physical // max(1, jax.local_device_count())
    return None


def step_fits_in_memory(compiled, device: jax.Device) -> tuple[bool, float]:
    """Whether a compiled step's temporaries fit in STEP_MEMORY_SHARE of the budget of `device`
    (one of this process's own) and of every other process's; also the temporaries in GiB.

    Every process must answer alike: they all have to run the same program.
    """
    analysis = compiled.memory_analysis()
    budget = memory_budget_bytes(device)
    if analysis is None or budget is None:
        fits, temp_gib = True, math.nan
    else:
        fits, temp_gib = analysis.temp_size_in_bytes <= STEP_MEMORY_SHARE * budget, analysis.temp_size_in_bytes / 2**30
    return sharding.on_every_process(fits), temp_gib
