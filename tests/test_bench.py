"""The benchmark in its quick mode, so that it never rots."""

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_results(bench):
    args = bench.parse_args(["--quick", "--size", "32", "--batch", "8", "--features", "4", "--steps", "2"])
    return bench.run_one(args)


POSITIVE_KEYS = (
    "gemm_gflops", "peak_gflops", "compile_s", "train_step_s", "train_images_per_s", "train_gflop_per_image",
    "train_fraction_of_peak", "infer_images_per_s", "infer_gflop_per_image", "infer_fraction_of_peak",
    "volume_infer_s", "peak_rss_mb", "input_batches_per_s", "input_augmented_batches_per_s", "input_epoch_s",
    "scoring_s",
)


def test_quick_run_reports_every_figure(quick_results):
    for key in POSITIVE_KEYS:
        value = quick_results[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert 0 <= quick_results["input_wait_fraction"] <= 1
    assert quick_results["input_epoch_steps"] == 3
    assert quick_results["volume_compiles"] == 1  # volumes of several lengths, one compiled function
    # A training step costs about three forward passes.
    ratio = quick_results["train_gflop_per_image"] / quick_results["infer_gflop_per_image"]
    assert 2.0 < ratio < 4.5
    settings = dict(quick_results["settings"])
    assert settings.pop("cpu_layout").startswith("CPU layout left to JAX (")  # the tests' 8 devices stand
    assert settings == {
        "batch": 8, "size": 32, "features": 4, "se": "scse", "dtype": "float32", "kernel_gradient": "fast",
        "steps": 2, "warmup": 1, "quick": True, "cpu_devices": "auto",
    }


def test_flops_count_the_whole_batch_however_many_devices_share_it(bench, quick_results):
    import functools

    from configs import default
    from scse_jax import prediction
    from scse_jax.state import build_model

    assert jax.device_count() == 8  # the quick run split its batch of 8 over 8 devices
    config = default.get_config()
    config.model.features = 4
    model = build_model(config.model, 5)
    images = jnp.zeros((8, 32, 32, 1), jnp.float32)
    variables = model.init(jax.random.key(0), images[:1], train=False)
    predict = jax.jit(functools.partial(prediction.predict_step, model=model, probabilities=False))
    one_device = bench.flops_of(predict.lower(variables, images).compile(), 1) / 8 / 1e9
    assert quick_results["infer_gflop_per_image"] == pytest.approx(one_device, rel=0.05)


def test_json_and_scaling_plot_are_written(bench, quick_results, tmp_path):
    bench.write_json(quick_results, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["train_images_per_s"] == quick_results["train_images_per_s"]
    rows = [
        {"size": size, "batch": 8, "train_images_per_s": quick_results["train_images_per_s"] * 32 / size,
         "infer_images_per_s": quick_results["infer_images_per_s"] * 32 / size}
        for size in (32, 64)
    ]
    bench.plot_scaling(rows, tmp_path / "plot.png", "test")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.summary_lines(quick_results)
    assert bench.plot_title(quick_results).endswith(", 8 JAX devices")  # the plot names how the CPU was split


def test_scaling_points_and_argument_checks(bench):
    args = bench.parse_args(["--batch", "20"])
    assert bench.scaling_points(args) == [(s, b) for s in (128, 256, 512) for b in (10, 20)]
    args = bench.parse_args(["--sizes", "32,64", "--batches", "8"])
    assert bench.scaling_points(args) == [(32, 8), (64, 8)]
    with pytest.raises(SystemExit):
        bench.parse_args(["--size", "40"])


def test_device_peak_table(bench):
    assert bench.device_peak_gflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989_000.0
    assert bench.device_peak_gflops("NVIDIA H100 PCIe", "float32") == 51_000.0
    assert bench.device_peak_gflops("cpu", "float32") is None


def test_compare_torch_without_torch_reports_the_project_alone(bench, quick_results, tmp_path):
    """An interpreter that cannot import torch (site-packages off): a message, no figures."""
    no_torch = tmp_path / "python-without-site-packages"
    no_torch.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    no_torch.chmod(0o755)
    args = bench.parse_args(["--quick", "--compare-torch", "--torch-python", str(no_torch)])
    result = bench.compare_torch(args, reuse={})
    assert result["status"] == "skipped" and not result["rounds"]
    assert "PyTorch is not installed" in result["message"] and "the project's figures alone" in result["message"]
    assert result["message"] in bench.summary_lines(dict(quick_results, torch_reference=result))


def test_a_reference_that_does_not_answer_in_time_is_killed(bench, tmp_path):
    pid_file = tmp_path / "pid"
    hanging = f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(60)"
    start = time.monotonic()
    with pytest.raises(bench.TorchReferenceError, match="no answer within 2 s"):
        bench.TorchReference([sys.executable, "-c", hanging], timeout=2)
    assert time.monotonic() - start < 20
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left sleeping
        os.kill(int(pid_file.read_text()), 0)
