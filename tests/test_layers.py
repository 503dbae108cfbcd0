"""The U-Net's own layers (layers.py) and the CPU kernel gradient (cpu_ops.py), which replace
XLA's slow CPU paths, against XLA's reference ops."""

from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from scse_jax.models import cpu_ops
from scse_jax.models.cpu_ops import CpuConv3x3
from scse_jax.models.cpu_ops import conv3x3_with_kernel_gradient_by_shifts as conv3x3
from scse_jax.models.layers import Conv3x3, max_pool2x2, upsample2x_bilinear


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


def test_upsample2x_bilinear_gradient_equals_jax_image_resize():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 6, 3)), jnp.float32)
    probe = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 12, 3)), jnp.float32)
    mine = jax.grad(lambda x: jnp.sum(upsample2x_bilinear(x) * probe))(x)
    theirs = jax.grad(lambda x: jnp.sum(jax.image.resize(x, (2, 8, 12, 3), method="bilinear") * probe))(x)
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)


def test_unet_gradients_are_the_same_with_either_kernel_gradient():
    from scse_jax.models.unet import UNet

    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 1)), jnp.float32)
    fast_model = UNet(num_classes=3, features=2, se="scse", conv=CpuConv3x3)
    xla_model = UNet(num_classes=3, features=2, se="scse")
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


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 64])
def test_kernel_gradient_is_exact_however_many_partial_sums(cores):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 10, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(2, 6, 10, 4)), jnp.float32)
    reference = jax.grad(
        lambda k: jnp.sum(lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) * probe)
    )(kernel)
    with mock.patch.object(cpu_ops.os, "sched_getaffinity", return_value=set(range(cores)), create=True):
        chunks = cpu_ops.kernel_gradient_chunks(2 * 8 * 10)
        fast = jax.grad(lambda k: jnp.sum(conv3x3(x, k) * probe))(kernel)
    assert chunks >= 1 and (2 * 8 * 10) % chunks == 0 and chunks <= max(cores, 1)
    np.testing.assert_allclose(fast, reference, rtol=1e-4, atol=1e-4)


def test_kernel_gradient_counts_the_cores_this_process_may_use_not_the_machines():
    with mock.patch.object(cpu_ops.os, "sched_getaffinity", return_value={0, 1}, create=True), \
            mock.patch.object(cpu_ops.os, "cpu_count", return_value=64):  # fmt: skip
        assert cpu_ops.kernel_gradient_chunks(160) == 2


@pytest.mark.parametrize("module", [Conv3x3, CpuConv3x3])
def test_conv3x3_of_several_inputs_equals_the_convolution_of_their_concatenation(module):
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(2, 8, 8, 5)), jnp.float32)
    layer = module(6)
    variables = layer.init(jax.random.key(0), a, b)
    assert variables["params"]["kernel"].shape == (3, 3, 8, 6)
    joined = jnp.concatenate([a, b], axis=-1)
    np.testing.assert_allclose(layer.apply(variables, a, b), layer.apply(variables, joined), rtol=1e-5, atol=1e-5)

    def loss(params, *inputs):
        return jnp.sum(jnp.sin(layer.apply({"params": params}, *inputs)))

    split_grad = jax.grad(loss)(variables["params"], a, b)
    joined_grad = jax.grad(loss)(variables["params"], joined)
    jax.tree.map(lambda s, j: np.testing.assert_allclose(s, j, rtol=1e-4, atol=1e-4), split_grad, joined_grad)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 2), half_h=st.integers(1, 5), half_w=st.integers(1, 5), c=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_max_pool2x2_equals_flax_max_pool_and_its_gradient(n, half_h, half_w, c, seed):
    # distinct values: no tied maxima, where the two gradients may split differently
    size = n * 2 * half_h * 2 * half_w * c
    values = np.random.default_rng(seed).permutation(size).astype(np.float32)
    x = jnp.asarray(values.reshape(n, 2 * half_h, 2 * half_w, c))
    expected = nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool2x2(x), expected)
    probe = jnp.asarray(np.random.default_rng(seed + 1).normal(size=expected.shape), jnp.float32)
    mine = jax.grad(lambda x: jnp.sum(max_pool2x2(x) * probe))(x)
    theirs = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)) * probe))(x)
    np.testing.assert_array_equal(mine, theirs)


def test_max_pool2x2_shares_the_gradient_of_tied_maxima():
    x = jnp.zeros((1, 2, 2, 1))
    grad = jax.grad(lambda x: jnp.sum(max_pool2x2(x)))(x)
    np.testing.assert_allclose(grad, np.full((1, 2, 2, 1), 0.25))


def test_the_cpu_convolution_is_chosen_only_on_the_cpu_and_only_when_asked(monkeypatch):
    assert cpu_ops.select_conv3x3(False) is Conv3x3
    monkeypatch.setattr(cpu_ops.jax, "default_backend", lambda: "cpu")
    assert cpu_ops.select_conv3x3(True) is CpuConv3x3
    monkeypatch.setattr(cpu_ops.jax, "default_backend", lambda: "gpu")
    assert cpu_ops.select_conv3x3(True) is Conv3x3


def test_either_convolution_restores_the_others_parameters():
    from scse_jax.models.unet import UNet

    x = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)

    def shapes(conv):
        model = UNet(num_classes=2, features=2, se="scse", conv=conv)
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
        return jax.tree.map(jnp.shape, variables)

    assert shapes(CpuConv3x3) == shapes(Conv3x3)
