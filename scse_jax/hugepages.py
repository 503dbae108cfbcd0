"""Restarts a process once with glibc's malloc on huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``).

XLA:CPU allocates every large intermediate afresh, and with 4 KiB pages the kernel's page faults
cost more than the arithmetic of the U-Net's cheap layers (`bench.py --plain-malloc` measures
the difference on a machine). glibc reads its
tunables only when a process starts, so the commands that train or time the network (launch.py,
``python -m scse_jax.experiment``, benchmarks/bench.py) call `restart_with_hugepages` first,
before JAX is imported. ``SCSE_PLAIN_MALLOC=1`` keeps the plain allocator, and a
``glibc.malloc.hugetlb`` setting of the user's own is left as it is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
PLAIN_MALLOC = "SCSE_PLAIN_MALLOC"  # set (to anything but 0): keep glibc's default allocator
MINIMUM_GLIBC = (2, 35)  # the first glibc with the hugetlb tunable


def glibc_version() -> tuple[int, ...] | None:
    """This process's glibc version, e.g. (2, 36); None where it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) if name == "glibc" else None


def wanted(environ: Mapping[str, str], glibc: tuple[int, ...] | None) -> bool:
    """Whether a process with ``environ`` on ``glibc`` (`glibc_version`) should restart with the
    tunable: on glibc 2.35 or newer, unless SCSE_PLAIN_MALLOC asks for the plain allocator or a
    hugetlb tunable is set already (the restart's own, or the user's)."""
    return (
        glibc is not None
        and glibc >= MINIMUM_GLIBC
        and environ.get(PLAIN_MALLOC, "0") in ("", "0")
        and "glibc.malloc.hugetlb=" not in environ.get("GLIBC_TUNABLES", "")
    )


def restart_environment(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with the tunable added to any tunables it already has."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, TUNABLE]))}


def started_as(entry: str, arguments: Sequence[str]) -> bool:
    """Whether the interpreter's ``arguments`` (sys.orig_argv[1:]) run ``entry``: a script's file
    name ("launch.py") or a module's name run with -m ("scse_jax.experiment"). A notebook, a
    debugger or another program that runs the entry inside itself is not restarted."""
    arguments = list(arguments)
    while arguments:
        argument = arguments.pop(0)
        if argument == "-m":
            return bool(arguments) and arguments[0] == entry
        if argument in ("-c", "-"):
            return False
        if argument in ("-X", "-W", "-Q"):  # options whose value is the next argument
            arguments = arguments[1:]
        elif not argument.startswith("-"):
            return Path(argument).name == entry
    return False


def restart_with_hugepages(entry: str) -> None:
    """Replaces this process (same PID, arguments and interpreter) by one with the tunable, where
    `wanted` says so and the process was started as ``entry`` (see `started_as`)."""
    if wanted(os.environ, glibc_version()) and started_as(entry, sys.orig_argv[1:]):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], restart_environment(dict(os.environ)))


def startup_note() -> str:
    """For a run's start-up line: "malloc on huge pages" where the tunable is in force, else ""."""
    in_force = TUNABLE in os.environ.get("GLIBC_TUNABLES", "") and (glibc_version() or (0,)) >= MINIMUM_GLIBC
    return "malloc on huge pages" if in_force else ""
