"""Multi-host start-up and failure, the 1-D data mesh, and host batches -> globally sharded
device arrays.

Data parallelism only: parameters are replicated, batches are split along their first axis
over the mesh axis "data", which spans every device of every process.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from scse_jax.data.pipeline import prefetch
from scse_jax.errors import ConfigError

DATA_AXIS = "data"


def _cluster_environment() -> str | None:
    """The multi-process launcher JAX can auto-detect, when it started more than one process."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in env for name in slurm) and _as_int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _as_int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "open mpi"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "cloud tpu"
    return None


def _as_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 1


def use_cpu_devices(count: int) -> None:
    """Splits the CPU into `count` JAX devices, each running its share of every batch.

    XLA:CPU runs one program at a time per device, and many of this U-Net's layers keep only
    part of a multi-core CPU busy, so two halves of a batch on two devices overlap (measured in
    benchmarks/README.md). No effect on accelerators. Must run before any JAX computation.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"the CPU device count must be a positive integer, got {count!r}")
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as error:
        raise ConfigError(f"cannot split the CPU into {count} devices after JAX has started: {error}") from error


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts jax.distributed for a multi-process run; a no-op for a single process.

    Explicit arguments are passed on; otherwise JAX's auto-detection runs only where a
    multi-process launcher (SLURM, Open MPI, Cloud TPU, JAX_COORDINATOR_ADDRESS) is seen.
    Calling it again once initialised does nothing. Must run before any other JAX call.
    """
    if jax.distributed.is_initialized() or not _starts_processes(coordinator_address, num_processes, process_id):
        return
    # Cross-process collectives on the CPU backend need gloo; accelerators ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except RuntimeError as error:
        raise ConfigError(f"cannot start multi-process JAX: {error}") from error


def _starts_processes(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if explicit:
        return num_processes != 1
    return _cluster_environment() is not None


def is_multi_process(distributed) -> bool:
    """Whether a run with this `config.distributed` starts jax.distributed (as train does)."""
    return _starts_processes(
        distributed.coordinator_address or None,
        distributed.num_processes or None,
        None if distributed.process_id < 0 else distributed.process_id,
    )


def on_every_process(flag: bool) -> bool:
    """True where `flag` is True on every process of the run; every process must call it."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def process_digests(tree) -> list[str]:
    """SHA-256 of each process's copy of a replicated pytree, in process order (equal digests:
    equal copies); every process must call it."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        digest.update(np.ascontiguousarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf).tobytes())
    if jax.process_count() == 1:
        return [digest.hexdigest()]
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.frombuffer(digest.digest(), np.uint8))
    return [bytes(row).hex() for row in np.asarray(gathered)]


def make_data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: every device of every process).

    The axis is Auto-typed: jit places the computation from the shardings of its inputs and
    outputs, and model code needs no sharding annotations.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ConfigError("a mesh needs at least one device")
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data"; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (parameters, optimiser state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ConfigError unless the global batch splits evenly over the mesh's devices."""
    if batch_size < 1 or batch_size % mesh.size:
        raise ConfigError(
            f"batch_size {batch_size} must be a positive multiple of the device count {mesh.size}"
        )


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's part of a global batch -> global arrays sharded along "data".

    Every process passes its own contiguous slice (B / process_count rows) of the global batch
    of B rows, as `iterate_batches(..., process_index, process_count)` yields it.
    """
    sharding = batch_sharding(mesh)
    local_devices = len(mesh.local_devices)
    arrays = {}
    for name, local in batch.items():
        local = np.asarray(local)
        if local.ndim == 0 or local.shape[0] % local_devices:
            raise ConfigError(
                f"batch[{name!r}] has shape {local.shape}: its first axis must split over the "
                f"{local_devices} local devices"
            )
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        arrays[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return arrays


def device_batches(
    iterator: Iterable[dict[str, np.ndarray]], mesh: Mesh, *, prefetch_size: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Shards host batches in a background thread, keeping `prefetch_size` ready on device."""
    return prefetch((shard_batch(batch, mesh) for batch in iterator), size=prefetch_size)


# When one process of a multi-process run dies, JAX ends the others: their next collective
# fails, or its C++ runtime aborts them with a native stack trace that Python cannot catch (at
# once where the dead process hosted the coordination service, else after a missed heartbeat).
# A process that fails in Python meets, at exit, jax.distributed's shutdown barrier, which
# waits for peers that may never come and then aborts as well. Hence every process of a
# multi-process launch works in a child of a small parent that turns an abort into one line,
# and a failing child leaves at once.

_RESUME_HINT = "Start every process again with the same command to resume from the latest checkpoint, if any."
_PARENT_PIPE = "SCSE_JAX_PARENT_PIPE"  # the child's end of a pipe that closes when the parent dies
_PEER_LOSS_MARKERS = ("gloo", "connection", "coordination", "barrier", "heartbeat")


def is_supervised() -> bool:
    """Whether this process is the working child of `supervise`."""
    return _PARENT_PIPE in os.environ


def supervise(command: Sequence[str]) -> int:
    """Runs `command` (this launch again) as a child process; returns the status to exit with.

    SIGTERM is passed on to the child; SIGINT, which a terminal sends to both, is left to it.
    The child's stderr passes through this parent, which watches it for JAX's fatal message.
    """
    read_end, write_end = os.pipe()
    child = subprocess.Popen(
        command, pass_fds=(read_end,), env={**os.environ, _PARENT_PIPE: str(read_end)}, stderr=subprocess.PIPE
    )
    os.close(read_end)
    forwarding = _StderrForwarder(child.stderr)
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum)),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
    }
    try:
        code = child.wait()
        forwarding.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(write_end)
    if code >= 0:
        return code
    # The runtime's abort may end in SIGSEGV instead of SIGABRT, when a fault handler dumping
    # the Python stacks crashes on the threads the runtime is tearing down.
    if forwarding.saw_runtime_abort or -code == signal.SIGABRT:
        reason = "JAX's distributed runtime aborted it, most likely because another process of the run stopped"
    else:
        reason = f"it was killed by {signal.Signals(-code).name}"
    print(f"error: this process of the run ended abnormally ({reason}). {_RESUME_HINT}", file=sys.stderr, flush=True)
    return 1


class _StderrForwarder:
    """Copies a child's stderr to ours as it comes, noting whether JAX's runtime aborted it."""

    _RUNTIME_ABORT = "JAX distributed service detected fatal errors"

    def __init__(self, stream) -> None:
        self.saw_runtime_abort = False
        self._stream = stream
        self._thread = threading.Thread(target=self._forward, name="stderr-forward", daemon=True)
        self._thread.start()

    def _forward(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tail = ""
        while chunk := self._stream.read1(65536):
            text = decoder.decode(chunk)
            sys.stderr.write(text)
            sys.stderr.flush()
            self.saw_runtime_abort = self.saw_runtime_abort or self._RUNTIME_ABORT in tail + text
            tail = (tail + text)[-len(self._RUNTIME_ABORT) :]
        self._stream.close()

    def join(self) -> None:
        self._thread.join(timeout=10)  # a grandchild may hold the pipe open


def stop_with_parent() -> None:
    """In the child of `supervise`: ends this process as soon as its parent is gone (killed),
    so that killing a launch stops its work, and with it the run's other processes."""
    read_end = int(os.environ[_PARENT_PIPE])

    def watch() -> None:
        os.read(read_end, 1)  # returns (empty) once the parent's end is closed
        with contextlib.suppress(OSError):  # our stderr went through the parent
            print("error: the launching process is gone: stopping", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@contextlib.contextmanager
def exit_at_once_on_failure() -> Iterator[None]:
    """Ends a failing process of a multi-process run at once (no shutdown barrier): its peers'
    collectives then fail and they stop too. The loss of a peer is told in one line."""
    try:
        yield
    except SystemExit as request:
        if not request.code or not jax.distributed.is_initialized():
            raise
        if not isinstance(request.code, int):
            print(request.code, file=sys.stderr)  # what SystemExit would have printed
            _exit_now(1)
        _exit_now(request.code)
    except Exception as error:
        if not jax.distributed.is_initialized():
            raise
        if any(marker in str(error).lower() for marker in _PEER_LOSS_MARKERS):
            line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            print(f"error: lost contact with another process of the run ({line}). {_RESUME_HINT}", file=sys.stderr)
        else:
            traceback.print_exc()
        _exit_now(1)


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
