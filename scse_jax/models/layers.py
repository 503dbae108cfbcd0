"""The U-Net's building blocks that replace XLA's slow CPU paths: a 3x3 convolution over
several inputs, exact 2x bilinear upsampling and 2x2 max-pooling. All NHWC."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

Dtype = Any
NHWC = ("NHWC", "HWIO", "NHWC")


def conv3x3(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """3x3 SAME convolution, NHWC x HWIO, with XLA's gradients.

    float32 result whatever the operands' dtype (bfloat16 operands accumulate in float32).
    """
    return lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=NHWC, preferred_element_type=jnp.float32
    )


class Conv3x3(nn.Module):
    """A 3x3 SAME convolution with nn.Conv's parameters ("kernel" HWIO, optional "bias").

    Subclasses change how the convolution is computed (`convolve`), never its parameters.

    Attributes:
      features: output channels.
      use_bias: add a learned bias.
      dtype: operand dtype of the convolutions, which accumulate and return float32.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    def convolve(self, x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
        return conv3x3(x, kernel)

    @nn.compact
    def __call__(self, *inputs: jnp.ndarray) -> jnp.ndarray:
        """Convolves the channel concatenation of the inputs, without building it."""
        widths = [x.shape[-1] for x in inputs]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, sum(widths), self.features), jnp.float32
        )
        kernel = kernel.astype(self.dtype)
        y = None
        start = 0
        for x, width in zip(inputs, widths):
            part = self.convolve(x.astype(self.dtype), kernel[:, :, start : start + width])
            y = part if y is None else y + part
            start += width
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
            y = y + bias
        return y


def upsample2x_bilinear(x: jnp.ndarray) -> jnp.ndarray:
    """Exact 2x bilinear upsampling of an NHWC batch (jax.image.resize's, half-pixel centres).

    Each output is 3/4 of its nearest input plus 1/4 of the next nearest, the border repeated;
    resize builds dense (n, 2n) weight matrices instead, a cost that grows with the side.
    """
    for axis in (1, 2):
        size = x.shape[axis]
        first = lax.slice_in_dim(x, 0, 1, axis=axis)
        last = lax.slice_in_dim(x, size - 1, size, axis=axis)
        padded = jnp.concatenate([first, x, last], axis=axis)
        before = lax.slice_in_dim(padded, 0, size, axis=axis)
        after = lax.slice_in_dim(padded, 2, size + 2, axis=axis)
        pair = jnp.stack([0.75 * x + 0.25 * before, 0.75 * x + 0.25 * after], axis=axis + 1)
        shape = list(x.shape)
        shape[axis] *= 2
        x = pair.reshape(shape)
    return x


def max_pool2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 stride-2 max-pooling of an NHWC batch with even sides.

    A reshape and a max: its gradient is elementwise, where XLA:CPU runs nn.max_pool's
    through a reduce-window over four index arrays.
    Tied maxima share the gradient instead of the first one taking it.
    """
    n, height, width, channels = x.shape
    return x.reshape(n, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))
