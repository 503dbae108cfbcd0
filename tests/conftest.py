"""Shared test set-up: a fast JAX on the CPU, paths to the real shared data."""

import os
from pathlib import Path

import pytest

# Eight fake CPU devices for the sharding tests; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
# Tests build the same tiny programs many times; a persistent cache compiles each once.
jax.config.update("jax_compilation_cache_dir", str(Path(__file__).resolve().parents[1] / ".cache" / "jax_tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CT_SAMPLE = Path(os.environ.get("SCSE_CHAOS_CT_SAMPLE", PROJECT_ROOT / "../shared/data/chaos_ct_sample"))
MR_T2 = Path(os.environ.get("SCSE_CHAOS_MR_T2", PROJECT_ROOT / "../shared/data/chaos_mr_t2"))


@pytest.fixture(scope="session")
def ct_sample_dir() -> Path:
    """The real CHAOS CT sample (DICOM_anon/, Ground/, Segmentation/), or a skip."""
    if not (CT_SAMPLE / "DICOM_anon").is_dir():
        pytest.skip(f"real CHAOS CT sample not found at {CT_SAMPLE} (set SCSE_CHAOS_CT_SAMPLE)")
    return CT_SAMPLE


@pytest.fixture(scope="session")
def mr_t2_dir() -> Path:
    """The real CHAOST2 NIfTI folder, or a skip."""
    if not any(MR_T2.glob("image_*.nii.gz")):
        pytest.skip(f"real CHAOS MR T2 NIfTI folder not found at {MR_T2} (set SCSE_CHAOS_MR_T2)")
    return MR_T2
