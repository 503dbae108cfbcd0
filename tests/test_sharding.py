"""Tests of the data mesh and sharded batches on the 8 fake CPU devices from conftest."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from scse_jax import sharding
from scse_jax.data.pipeline import SliceDataset, iterate_batches
from scse_jax.errors import ConfigError


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "conftest should give 8 fake CPU devices"
    return sharding.make_data_mesh()


def host_batch(size: int = 16, side: int = 4):
    images = np.arange(size * side * side, dtype=np.float32).reshape(size, side, side, 1)
    labels = (np.arange(size * side * side) % 5).astype(np.int32).reshape(size, side, side)
    return {"image": images, "label": labels}


def test_mesh_spans_every_device_on_one_data_axis(mesh):
    assert mesh.axis_names == ("data",)
    assert mesh.devices.shape == (8,)
    assert set(mesh.devices.ravel()) == set(jax.devices())
    assert sharding.batch_sharding(mesh).spec == PartitionSpec("data")
    assert sharding.replicated_sharding(mesh).spec == PartitionSpec()
    small = sharding.make_data_mesh(jax.devices()[:2])
    assert small.devices.shape == (2,)


def test_shard_batch_puts_the_right_rows_on_each_device(mesh):
    batch = host_batch(16)
    arrays = sharding.shard_batch(batch, mesh)
    for name, array in arrays.items():
        assert isinstance(array, jax.Array)
        assert array.shape == batch[name].shape and array.dtype == batch[name].dtype
        assert array.sharding.spec == PartitionSpec("data")
        np.testing.assert_array_equal(np.asarray(array), batch[name])
        shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
        assert len(shards) == 8 and len({s.device for s in shards}) == 8
        for number, shard in enumerate(shards):
            assert shard.data.shape[0] == 2
            position = list(mesh.devices).index(shard.device)
            np.testing.assert_array_equal(np.asarray(shard.data), batch[name][2 * position : 2 * position + 2])
            assert shard.index[0] == slice(2 * number, 2 * number + 2)


def test_sharded_batch_feeds_a_jitted_step(mesh):
    arrays = sharding.shard_batch(host_batch(8), mesh)
    total = jax.jit(lambda b: b["image"].sum(), out_shardings=sharding.replicated_sharding(mesh))(arrays)
    assert float(total) == pytest.approx(float(host_batch(8)["image"].sum()))


def test_batch_size_must_divide_over_the_devices(mesh):
    sharding.check_batch_size(16, mesh)
    with pytest.raises(ConfigError, match="12.*8"):
        sharding.check_batch_size(12, mesh)
    with pytest.raises(ConfigError):
        sharding.check_batch_size(0, mesh)
    with pytest.raises(ConfigError, match="'image'"):
        sharding.shard_batch({"image": np.zeros((12, 4, 4, 1), np.float32)}, mesh)


def test_device_batches_streams_an_epoch(mesh):
    dataset = SliceDataset(**{k + "s": v for k, v in host_batch(40).items()})
    host = list(iterate_batches(dataset, batch_size=16, epoch=1, seed=3))
    on_device = list(sharding.device_batches(iterate_batches(dataset, batch_size=16, epoch=1, seed=3), mesh))
    assert len(on_device) == len(host) == 2
    for expected, got in zip(host, on_device):
        assert got["image"].sharding.spec == PartitionSpec("data")
        np.testing.assert_array_equal(np.asarray(got["image"]), expected["image"])
        np.testing.assert_array_equal(np.asarray(got["label"]), expected["label"])


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append(args))
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    sharding.initialize_distributed()
    sharding.initialize_distributed()
    sharding.initialize_distributed(num_processes=1)
    # A single-task SLURM job is still one process.
    single_task = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}
    for name, value in dict(single_task, SLURM_PROCID="0", SLURM_LOCALID="0").items():
        monkeypatch.setenv(name, value)
    sharding.initialize_distributed()
    assert calls == []
    assert jax.process_count() == 1


def test_initialize_distributed_starts_jax_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append(args))
    sharding.initialize_distributed("10.0.0.1:1234", 2, 1)
    assert calls == [("10.0.0.1:1234", 2, 1)]
    monkeypatch.setenv("SLURM_NTASKS", "4")
    for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.setenv(name, "0")
    sharding.initialize_distributed()
    assert calls[-1] == (None, None, None)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    sharding.initialize_distributed("10.0.0.1:1234", 2, 1)
    assert len(calls) == 2


def test_initialize_distributed_too_late_is_a_config_error(monkeypatch):
    def too_late(*args):
        raise RuntimeError("must be called before any JAX calls")

    monkeypatch.setattr(jax.distributed, "initialize", too_late)
    with pytest.raises(ConfigError, match="before any JAX"):
        sharding.initialize_distributed("10.0.0.1:1234", 2, 0)


@pytest.mark.parametrize("count", [0, -2, 1.5, True, "2"])
def test_cpu_device_count_must_be_a_positive_integer(count):
    with pytest.raises(ConfigError, match="positive integer"):
        sharding.use_cpu_devices(count)


def test_cpu_devices_cannot_change_once_jax_has_started():
    jax.devices()
    with pytest.raises(ConfigError, match="after JAX has started"):
        sharding.use_cpu_devices(2)
