"""Multi-host start-up, the 1-D data mesh, and host batches -> globally sharded device arrays.

Data parallelism only: parameters are replicated, batches are split along their first axis
over the mesh axis "data", which spans every device of every process.
"""

from __future__ import annotations

import os
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
    part of a multi-core CPU busy; two devices on a 2-core EPYC ran inference 1.4x and the train
    step up to 1.3x faster than one (benchmarks/README.md). No effect on accelerators. Must run
    before any JAX computation.
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
    if jax.distributed.is_initialized():
        return
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if explicit and num_processes == 1:
        return
    if not explicit and _cluster_environment() is None:
        return
    # Cross-process collectives on the CPU backend need gloo; accelerators ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except RuntimeError as error:
        raise ConfigError(f"cannot start multi-process JAX: {error}") from error


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
