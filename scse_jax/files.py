"""How the package writes files that something reads later, and how a run holds its workdir.

`atomic_write`: the content goes to a hidden temporary file beside the target, is flushed to
disk and renamed over the target, so a reader finds the old content or the new, never a part.
A full disk or a missing permission leaves the target as it was, removes the temporary file
and raises OutputError (one line); a kill can leave only a hidden `.<name>.*.tmp` file that
nothing reads.

`WorkdirLock`: the process training in a workdir holds an flock on `<workdir>/.lock`, which
records who holds it; the kernel releases it when the process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from scse_jax.errors import ConfigError, OutputError


@contextlib.contextmanager
def atomic_write(
    path: Path | str, mode: str = "w", *, newline: str | None = None, prefix: str | None = None, suffix: str = ".tmp"
) -> Iterator[IO]:
    """A stream ("w" text or "wb" binary) whose content replaces `path` when the block ends
    without an error; on any error `path` is untouched and the temporary file removed."""
    path = Path(path)
    prefix = f".{path.name}." if prefix is None else prefix
    temporary = path.parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
    try:
        stream = open(temporary, mode.replace("w", "x"), newline=newline)
    except OSError as error:
        raise _output_error(path, error) from error
    try:
        with stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _output_error(path, error) from error
        raise
    _sync_folder(path.parent)


def write_text(path: Path | str, text: str) -> None:
    """Replaces `path` with `text`, atomically (see `atomic_write`)."""
    with atomic_write(path) as stream:
        stream.write(text)


def check_file_target(path: Path | str, option: str) -> None:
    """Refuses, before any work, a file name that names a folder or lies under a file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; name a file")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")


def _output_error(path: Path, error: OSError) -> OutputError:
    return OutputError(f"cannot write {path} ({error.strerror or error}); what was there is unchanged")


def _sync_folder(folder: Path) -> None:
    """Makes a rename in `folder` durable (best effort: not every file system allows it)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class WorkdirLock:
    """An exclusive lock on a run's workdir, held while a process trains in it.

    A second process asking for it gets a ConfigError naming the holder. Process k > 0 of a
    multi-process run locks `.lock.<k>` beside the first process's `.lock`.
    """

    def __init__(self, workdir: Path | str, *, process: int = 0):
        workdir = Path(workdir)
        self.path = workdir / (".lock" if process == 0 else f".lock.{process}")
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ConfigError(f"--workdir {workdir}: cannot open {self.path.name} ({error.strerror or error})") from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            holder = os.read(descriptor, 512).decode(errors="replace").strip() or "another process"
            os.close(descriptor)
            raise ConfigError(
                f"--workdir {workdir} is in use by {holder}; wait for it to end or use another --workdir"
            ) from error
        except OSError as error:  # a file system without locks
            os.close(descriptor)
            raise ConfigError(f"--workdir {workdir}: cannot lock {self.path.name} ({error.strerror or error})") from error
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()} since {since}".encode())
        self._descriptor: int | None = descriptor

    def release(self) -> None:
        """Clears the holder's name and gives the lock up (closing the file does)."""
        if self._descriptor is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._descriptor, 0)
        os.close(self._descriptor)
        self._descriptor = None

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
