"""The benchmark in its quick mode (so that it never rots) and the model's fast CPU paths."""

import importlib.util
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from scse_jax.models.unet import conv3x3, upsample2x_bilinear

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
    assert quick_results["settings"] == {
        "batch": 8, "size": 32, "features": 4, "se": "scse", "dtype": "float32", "steps": 2, "warmup": 1,
        "quick": True,
    }


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


@pytest.mark.parametrize("channels", [(1, 4), (6, 5)])
def test_conv3x3_matches_xla_convolution_and_its_gradients(channels):
    cin, cout = channels
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 8, 12, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(3, 8, 12, cout)), jnp.float32)

    def reference(x, kernel):
        return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    np.testing.assert_allclose(conv3x3(x, kernel), reference(x, kernel), rtol=1e-5, atol=1e-5)
    fast = jax.grad(lambda x, k: jnp.sum(conv3x3(x, k) * probe), argnums=(0, 1))(x, kernel)
    slow = jax.grad(lambda x, k: jnp.sum(reference(x, k) * probe), argnums=(0, 1))(x, kernel)
    for mine, theirs in zip(fast, slow):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)


def test_upsample2x_bilinear_equals_jax_image_resize():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 7, 3)), jnp.float32)
    expected = jax.image.resize(x, (2, 10, 14, 3), method="bilinear")
    np.testing.assert_allclose(upsample2x_bilinear(x), expected, rtol=1e-6, atol=1e-6)


def test_unet_gradients_are_the_same_with_either_kernel_gradient():
    from scse_jax.models.unet import UNet

    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 1)), jnp.float32)
    fast_model = UNet(num_classes=3, features=2, se="scse")
    xla_model = UNet(num_classes=3, features=2, se="scse", fast_kernel_gradient=False)
    variables = fast_model.init(jax.random.key(0), x, train=False)

    def grads(model):
        def loss(params):
            logits, _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(logits**2)

        return jax.grad(loss)(variables["params"])

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), grads(fast_model), grads(xla_model)
    )
