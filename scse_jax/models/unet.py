"""A 2-D U-Net with optional squeeze-and-excitation blocks after its encoder, bottleneck
and decoder blocks.

The U-Net is 2-D (NHWC); the SE blocks in se.py are rank-generic.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from scse_jax.models.se import (
    ChannelSE,
    ChannelSpatialSE,
    SpatialSE,
    check_aggregation,
    check_reduction,
)

SE_KINDS = ("none", "cse", "sse", "scse")
SE_POSITIONS = ("encoder", "bottleneck", "decoder")
UPSAMPLINGS = ("bilinear", "transpose")
DEPTH = 4  # encoder blocks; every input side must be divisible by 2**DEPTH
BATCH_NORM_MOMENTUM = 0.9

Dtype = Any


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or jax.ShapeDtypeStruct."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def make_se_block(
    kind: str, *, reduction: int, aggregation: str, dtype: Dtype, name: str
) -> nn.Module | None:
    """The SE module of the given kind ("none" gives None)."""
    if kind == "cse":
        return ChannelSE(reduction, dtype=dtype, name=name)
    if kind == "sse":
        return SpatialSE(dtype=dtype, name=name)
    if kind == "scse":
        return ChannelSpatialSE(reduction, aggregation, dtype=dtype, name=name)
    return None


_NHWC = ("NHWC", "HWIO", "NHWC")
# UNet(fast_kernel_gradient=True), the default, computes 3x3 kernel gradients on the CPU with
# `_kernel_gradient_by_shifts`, faster there for more of the train step's temporary memory
# (figures in benchmarks/README.md). False restores XLA's gradient and memory; the parameters
# are the same either way.


def _conv3x3(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """float32 result whatever the operands' dtype (bfloat16 operands accumulate in float32)."""
    return lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC, preferred_element_type=jnp.float32
    )


def _kernel_gradient_chunks(contraction: int) -> int:
    """Independent partial sums the kernel gradient is split into: about one per core.

    Eigen runs a product with a huge contraction and a tiny result on one core; a batch of
    partial products spreads over all of them. The count is a power of two (at most 16)
    that divides the contraction.
    """
    cores = min(16, 1 << ((os.cpu_count() or 1).bit_length() - 1))
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


def _kernel_gradient_by_shifts(x: jnp.ndarray, grad: jnp.ndarray) -> jnp.ndarray:
    """d(loss)/d(kernel) of a 3x3 SAME convolution as one matrix product.

    kernel_grad[dy, dx, c, o] = sum over (n, h, w) of x_pad[n, h, w + dx, c] * g[n, h - dy, w, o]:
    the three column shifts of x and the three row shifts of the output gradient g become
    channels, and one product over (n, h, w) gives all nine taps. XLA:CPU runs the kernel
    gradient as a convolution with a whole image as its window, at 5-12 GFLOP/s; this runs at
    25-75 GFLOP/s on the U-Net's shapes (2-core EPYC, batch 20, 256 px).
    """
    n, height, width, cin = x.shape
    cout = grad.shape[-1]
    x_columns = _shifted_copies(x, [((1, 1), (1 - dx, dx - 1)) for dx in range(3)])
    grad_rows = _shifted_copies(grad, [((dy, 2 - dy), (0, 0)) for dy in range(3)])
    chunks = _kernel_gradient_chunks(n * (height + 2) * width)
    partial = jnp.einsum(
        "bko,bkc->boc",
        grad_rows.reshape(chunks, -1, 3 * cout),
        x_columns.reshape(chunks, -1, 3 * cin),
        preferred_element_type=jnp.float32,
    )
    return partial.sum(0).reshape(3, cout, 3, cin).transpose(0, 2, 3, 1)


def conv3x3(x: jnp.ndarray, kernel: jnp.ndarray, *, fast_kernel_gradient: bool = True) -> jnp.ndarray:
    """3x3 SAME convolution, NHWC x HWIO, whose kernel gradient is cheap on the CPU.

    The convolution itself (and so the input gradient) is XLA's; only the kernel gradient
    is attached separately, by `_with_kernel_gradient`.
    """
    if not fast_kernel_gradient:
        return _conv3x3(x, kernel)
    y = _conv3x3(x, lax.stop_gradient(kernel))
    return _with_kernel_gradient(y, lax.stop_gradient(x), kernel)


@jax.custom_vjp
def _with_kernel_gradient(y: jnp.ndarray, x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """The identity on y = conv3x3(x, kernel), carrying d(loss)/d(kernel) in its VJP."""
    return y


def _with_kernel_gradient_forward(y, x, kernel):
    return y, (x, kernel)


def _with_kernel_gradient_backward(residuals, grad):
    x, kernel = residuals
    if jax.default_backend() == "cpu":
        kernel_grad = _kernel_gradient_by_shifts(x, grad).astype(kernel.dtype)
    else:  # accelerators' own convolution gradients are fast
        _, pullback = jax.vjp(lambda k: _conv3x3(x, k), kernel)
        (kernel_grad,) = pullback(grad)
    return grad, jnp.zeros_like(x), kernel_grad


_with_kernel_gradient.defvjp(_with_kernel_gradient_forward, _with_kernel_gradient_backward)


class Conv3x3(nn.Module):
    """A 3x3 SAME convolution with nn.Conv's parameters ("kernel" HWIO, optional "bias").

    Attributes:
      features: output channels.
      use_bias: add a learned bias.
      dtype: operand dtype of the convolutions, which accumulate and return float32.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    fast_kernel_gradient: bool = True

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
            part = conv3x3(
                x.astype(self.dtype), kernel[:, :, start : start + width],
                fast_kernel_gradient=self.fast_kernel_gradient,
            )
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
    through a reduce-window over four index arrays (about 1 s of a 12 s train step here).
    Tied maxima share the gradient instead of the first one taking it.
    """
    n, height, width, channels = x.shape
    return x.reshape(n, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class DoubleConv(nn.Module):
    """(conv3x3 -> BatchNorm -> ReLU) twice.

    Attributes:
      features: output channels of both convolutions.
      dtype: operand dtype of the convolutions, which accumulate and return float32.
    """

    features: int
    dtype: Dtype = jnp.float32
    fast_kernel_gradient: bool = True

    @nn.compact
    def __call__(self, *inputs: jnp.ndarray, train: bool) -> jnp.ndarray:
        """The first convolution reads the channel concatenation of the inputs."""
        for i in (1, 2):
            x = Conv3x3(
                self.features, use_bias=False, dtype=self.dtype, fast_kernel_gradient=self.fast_kernel_gradient,
                name=f"conv{i}",
            )(*inputs)
            x = nn.BatchNorm(
                use_running_average=not train, momentum=BATCH_NORM_MOMENTUM, dtype=jnp.float32,
                name=f"bn{i}",
            )(x)
            x = nn.relu(x)
            inputs = (x,)
        return x


class UpBlock(nn.Module):
    """Upsample x2 to half the channels, then a DoubleConv over (skip, upsampled) as channels.

    Attributes:
      features: output channels (the skip's channels).
      upsample: "bilinear" (resize, then a 3x3 convolution) or "transpose" (2x2 stride-2
        transposed convolution).
      dtype: operand dtype of the convolutions, which accumulate and return float32.
    """

    features: int
    upsample: str = "bilinear"
    dtype: Dtype = jnp.float32
    fast_kernel_gradient: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, skip: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if self.upsample == "transpose":
            x = nn.ConvTranspose(
                self.features, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                name="up",
            )(x).astype(jnp.float32)
        else:
            x = upsample2x_bilinear(x)
            x = Conv3x3(
                self.features, dtype=self.dtype, fast_kernel_gradient=self.fast_kernel_gradient, name="up"
            )(x)
        return DoubleConv(
            self.features, dtype=self.dtype, fast_kernel_gradient=self.fast_kernel_gradient, name="conv"
        )(skip, x, train=train)


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with SE blocks as in Roy et al. (TMI 2019).

    Four DoubleConv encoder blocks of widths features * (1, 2, 4, 8) with 2x2 max-pooling,
    a DoubleConv bottleneck of width features * 16, four UpBlock decoder blocks and a 1x1
    convolution to logits. An SE block follows every block of the chosen positions.
    Submodules: enc1..enc4, bottleneck, dec4..dec1, head; an SE block is named after its
    block with "_se" appended (e.g. enc1_se).

    Attributes:
      num_classes: output channels (logits).
      features: width of the first encoder block.
      se: "none", "cse", "sse" or "scse".
      se_reduction: ratio r of the cSE bottleneck.
      se_aggregation: scSE aggregation, "max", "add" or "mul".
      se_positions: any of "encoder", "bottleneck", "decoder".
      upsample: "bilinear" or "transpose".
      dtype: operand dtype of the 3x3 and transposed convolutions (e.g. bfloat16 for GPU tensor
        cores). They accumulate in float32, and everything else (BatchNorm, SE blocks, the
        head, the gradients' reductions) computes in float32: with bfloat16 throughout, the
        reductions behind the bias, BatchNorm and SE gradients lost 19% of the gradient (median
        relative error against float32, one batch) on the CPU.
      fast_kernel_gradient: CPU-friendly 3x3 kernel gradients (faster, more memory).
    """

    num_classes: int
    features: int = 16
    se: str = "none"
    se_reduction: int = 2
    se_aggregation: str = "max"
    se_positions: Sequence[str] = SE_POSITIONS
    upsample: str = "bilinear"
    dtype: Dtype = jnp.float32
    fast_kernel_gradient: bool = True

    def __post_init__(self):
        self._check_config()
        super().__post_init__()

    def _check_config(self) -> None:
        if self.se not in SE_KINDS:
            raise ValueError(f"UNet.se must be one of {SE_KINDS}, got {self.se!r}")
        if self.upsample not in UPSAMPLINGS:
            raise ValueError(f"UNet.upsample must be one of {UPSAMPLINGS}, got {self.upsample!r}")
        if isinstance(self.se_positions, str):
            raise ValueError(
                "UNet.se_positions must be a sequence of names, "
                f"got the string {self.se_positions!r}"
            )
        unknown = [p for p in self.se_positions if p not in SE_POSITIONS]
        if unknown:
            raise ValueError(f"UNet.se_positions must be among {SE_POSITIONS}, got {unknown}")
        check_reduction(self.se_reduction, "UNet.se")
        check_aggregation(self.se_aggregation, "UNet.se")
        for name in ("num_classes", "features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"UNet.{name} must be a positive integer, got {value!r}")

    def _check_input(self, x: jnp.ndarray) -> None:
        if x.ndim != 4:
            raise ValueError(f"UNet expects an NHWC batch of rank 4, got shape {tuple(x.shape)}")
        multiple = 2**DEPTH
        height, width = x.shape[1:3]
        if height % multiple or width % multiple:
            raise ValueError(
                f"UNet input height and width must be divisible by {multiple}, "
                f"got {height}x{width} (shape {tuple(x.shape)})"
            )

    def _se(self, position: str, name: str):
        """The SE block after block `name`, or the identity where none is configured."""
        if position not in self.se_positions:
            return lambda y: y
        block = make_se_block(
            self.se, reduction=self.se_reduction, aggregation=self.se_aggregation,
            dtype=jnp.float32, name=f"{name}_se",
        )
        return block or (lambda y: y)

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Maps an (N, H, W, C) float batch to (N, H, W, num_classes) float32 logits."""
        self._check_input(x)
        x = x.astype(jnp.float32)
        skips = []
        for level in range(1, DEPTH + 1):
            name = f"enc{level}"
            width = self.features * 2 ** (level - 1)
            x = DoubleConv(width, dtype=self.dtype, fast_kernel_gradient=self.fast_kernel_gradient, name=name)(
                x, train=train
            )
            x = self._se("encoder", name)(x)
            skips.append(x)
            x = max_pool2x2(x)
        bottleneck_width = self.features * 2**DEPTH
        x = DoubleConv(
            bottleneck_width, dtype=self.dtype, fast_kernel_gradient=self.fast_kernel_gradient, name="bottleneck"
        )(x, train=train)
        x = self._se("bottleneck", "bottleneck")(x)
        for level in range(DEPTH, 0, -1):
            name = f"dec{level}"
            width = self.features * 2 ** (level - 1)
            x = UpBlock(
                width, self.upsample, dtype=self.dtype, fast_kernel_gradient=self.fast_kernel_gradient, name=name
            )(
                x, skips[level - 1], train=train
            )
            x = self._se("decoder", name)(x)
        logits = nn.Conv(self.num_classes, (1, 1), dtype=jnp.float32, name="head")(x)
        return logits.astype(jnp.float32)

