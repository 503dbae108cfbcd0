"""Restarts a process once with glibc's malloc on huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``).

XLA:CPU allocates every large intermediate afresh, and with 4 KiB pages the kernel's page faults
cost more than the arithmetic of the U-Net's cheap layers (benchmarks/README.md). glibc reads its
tunables only when a process starts, so the entry points that train or time the network
(launch.py, ``python -m scse_jax.experiment``, benchmarks/bench.py) call `restart_with_hugepages`
first, before JAX is imported. ``SCSE_PLAIN_MALLOC=1`` in the environment keeps the plain
allocator.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
PLAIN_MALLOC = "SCSE_PLAIN_MALLOC"  # set to 1: keep glibc's default allocator
_RESTARTED = "SCSE_HUGEPAGES_RESTARTED"


def wanted(environ: dict[str, str] | None = None, *, platform: str | None = None) -> bool:
    """Whether this process should restart with the tunable: on Linux, once, unless it is set
    already or SCSE_PLAIN_MALLOC asks for the plain allocator."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    return (
        platform == "linux"
        and environ.get(PLAIN_MALLOC, "") not in ("1", "true", "True")
        and not environ.get(_RESTARTED)
        and TUNABLE not in environ.get("GLIBC_TUNABLES", "")
    )


def restart_environment(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with the tunable added to any tunables it already has, and the restart marked."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, TUNABLE])), _RESTARTED: "1"}


def restart_with_hugepages() -> None:
    """Replaces this process (same PID, arguments and interpreter) by one with the tunable;
    returns without doing anything where `wanted` says no."""
    if wanted():
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], restart_environment(dict(os.environ)))


def startup_note() -> str:
    """For a run's start-up line: "malloc on huge pages" where the tunable is set, else ""."""
    return "malloc on huge pages" if TUNABLE in os.environ.get("GLIBC_TUNABLES", "") else ""
