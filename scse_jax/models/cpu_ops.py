"""A 3x3 convolution whose kernel gradient is fast on XLA:CPU, and the choice of convolution.

XLA:CPU computes a convolution's kernel gradient as a convolution with a whole image as its
window, which runs far below the machine's matrix-product speed. `CpuConv3x3` keeps XLA's
convolution and input gradient and computes the kernel gradient as one matrix product over
shifted copies of the input, for more of the train step's temporary memory. Its parameters
are `Conv3x3`'s, so either convolution restores the other's checkpoints. Measurements are in
benchmarks/README.md.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from jax import lax

from scse_jax.models.layers import Conv3x3, conv3x3


def select_conv3x3(fast_kernel_gradient: bool) -> type[Conv3x3]:
    """The 3x3 convolution a model built now should use (config model.fast_kernel_gradient).

    Accelerators' own convolution gradients are fast, so only the CPU backend gets `CpuConv3x3`.
    """
    if fast_kernel_gradient and jax.default_backend() == "cpu":
        return CpuConv3x3
    return Conv3x3


def kernel_gradient_chunks(contraction: int) -> int:
    """Independent partial sums the kernel gradient is split into: about one per core.

    Eigen runs a product with a huge contraction and a tiny result on one core; a batch of
    partial products spreads over all of them. The count is a power of two (at most 16)
    that divides the contraction. Cores are those this process may run on (a container or
    ``taskset`` may allow fewer than the machine has).
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = min(16, 1 << (usable.bit_length() - 1))
    return math.gcd(cores, contraction)


def _shifted_copies(x: jnp.ndarray, pads) -> jnp.ndarray:
    """Copies of an NHWC x, each zero-padded (negative pads crop) along H and W, as channels.

    Stacking on a new axis before the channels lets XLA write all copies in one pass; a
    concatenation of padded slices costs twice that here.
    """
    n = x.shape[0]
    copies = [
        lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (*rows, 0), (*columns, 0), (0, 0, 0)])
        for rows, columns in pads
    ]
    stacked = jnp.stack(copies, axis=-2)
    return stacked.reshape(n, stacked.shape[1], stacked.shape[2], -1)


def kernel_gradient_by_shifts(x: jnp.ndarray, grad: jnp.ndarray) -> jnp.ndarray:
    """d(loss)/d(kernel) of a 3x3 SAME convolution as one matrix product.

    kernel_grad[dy, dx, c, o] = sum over (n, h, w) of x_pad[n, h, w + dx, c] * g[n, h - dy, w, o]:
    the three column shifts of x and the three row shifts of the output gradient g become
    channels, and one product over (n, h, w) gives all nine taps.
    """
    n, height, width, cin = x.shape
    cout = grad.shape[-1]
    x_columns = _shifted_copies(x, [((1, 1), (1 - dx, dx - 1)) for dx in range(3)])
    grad_rows = _shifted_copies(grad, [((dy, 2 - dy), (0, 0)) for dy in range(3)])
    chunks = kernel_gradient_chunks(n * (height + 2) * width)
    partial_sums = jnp.einsum(
        "bko,bkc->boc",
        grad_rows.reshape(chunks, -1, 3 * cout),
        x_columns.reshape(chunks, -1, 3 * cin),
        preferred_element_type=jnp.float32,
    )
    return partial_sums.sum(0).reshape(3, cout, 3, cin).transpose(0, 2, 3, 1)


def conv3x3_with_kernel_gradient_by_shifts(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """`layers.conv3x3` whose kernel gradient is `kernel_gradient_by_shifts`.

    The convolution itself (and so the input gradient) is XLA's; only the kernel gradient
    is attached separately, by `_with_kernel_gradient`.
    """
    y = conv3x3(x, lax.stop_gradient(kernel))
    return _with_kernel_gradient(y, lax.stop_gradient(x), kernel)


@jax.custom_vjp
def _with_kernel_gradient(y: jnp.ndarray, x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """The identity on y = conv3x3(x, kernel), carrying d(loss)/d(kernel) in its VJP."""
    return y


def _with_kernel_gradient_forward(y, x, kernel):
    return y, (x, kernel)


def _with_kernel_gradient_backward(residuals, grad):
    x, kernel = residuals
    kernel_grad = kernel_gradient_by_shifts(x, grad).astype(kernel.dtype)
    return grad, jnp.zeros_like(x), kernel_grad


_with_kernel_gradient.defvjp(_with_kernel_gradient_forward, _with_kernel_gradient_backward)


class CpuConv3x3(Conv3x3):
    """`Conv3x3` (same parameters) whose kernel gradient is one matrix product on the CPU."""

    def convolve(self, x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
        return conv3x3_with_kernel_gradient_by_shifts(x, kernel)
