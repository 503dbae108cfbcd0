"""Squeeze-and-excitation blocks of Roy, Navab and Wachinger (IEEE TMI 2019).

Channels-last and rank-generic: the same modules work on 2-D (N, H, W, C) and 3-D
(N, D, H, W, C) feature maps. Each returns an array of the input's shape and dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

AGGREGATIONS = ("max", "add", "mul")

Dtype = Any


def check_feature_map(x: jnp.ndarray, block: str) -> None:
    """Raises ValueError unless x has a batch axis, at least one spatial axis and channels."""
    if x.ndim < 3:
        raise ValueError(
            f"{block} expects a channels-last feature map (N, *spatial, C) of rank >= 3, "
            f"got shape {tuple(x.shape)}"
        )


def check_reduction(reduction: int, block: str) -> None:
    """Raises ValueError unless the channel reduction ratio is a positive integer."""
    if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction < 1:
        raise ValueError(f"{block}.reduction must be a positive integer, got {reduction!r}")


def check_aggregation(aggregation: str, block: str) -> None:
    """Raises ValueError unless aggregation is one of AGGREGATIONS."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"{block}.aggregation must be one of {AGGREGATIONS}, got {aggregation!r}"
        )


def bottleneck_width(channels: int, reduction: int) -> int:
    """Width of the cSE bottleneck, C // r, never below one unit."""
    return max(1, channels // reduction)


class ChannelSE(nn.Module):
    """Spatial squeeze and channel excitation (cSE, Hu et al. 2018).

    z = mean of U over every spatial axis; gate = sigmoid(W1 relu(W2 z)); U_cSE = gate * U,
    one factor per channel.

    Attributes:
      reduction: ratio r of the bottleneck; its width is max(1, C // r).
      dtype: computation dtype; None computes in the input's dtype.
      param_dtype: dtype of the parameters.
    """

    reduction: int = 2
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_reduction(self.reduction, type(self).__name__)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        check_feature_map(x, type(self).__name__)
        dtype = x.dtype if self.dtype is None else self.dtype
        channels = x.shape[-1]
        spatial_axes = tuple(range(1, x.ndim - 1))
        z = jnp.mean(x.astype(dtype), axis=spatial_axes)  # (N, C)
        hidden = nn.Dense(
            bottleneck_width(channels, self.reduction),
            dtype=dtype,
            param_dtype=self.param_dtype,
            name="squeeze",
        )(z)
        gate = nn.Dense(channels, dtype=dtype, param_dtype=self.param_dtype, name="excite")(
            nn.relu(hidden)
        )
        gate = nn.sigmoid(gate).reshape(x.shape[:1] + (1,) * len(spatial_axes) + (channels,))
        return (x.astype(dtype) * gate).astype(x.dtype)


class SpatialSE(nn.Module):
    """Channel squeeze and spatial excitation (sSE).

    q = W_sq * U, a 1x1(x1) convolution to one channel; U_sSE = sigmoid(q) * U, one factor
    per location.

    Attributes:
      dtype: computation dtype; None computes in the input's dtype.
      param_dtype: dtype of the parameters.
    """

    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        check_feature_map(x, type(self).__name__)
        dtype = x.dtype if self.dtype is None else self.dtype
        spatial_rank = x.ndim - 2
        q = nn.Conv(
            1,
            kernel_size=(1,) * spatial_rank,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name="squeeze",
        )(x.astype(dtype))
        return (x.astype(dtype) * nn.sigmoid(q)).astype(x.dtype)


class ChannelSpatialSE(nn.Module):
    """Concurrent spatial and channel squeeze and excitation (scSE).

    Runs ChannelSE ("cse") and SpatialSE ("sse") on the same input and aggregates them
    element-wise: "max" is the TMI 2019 max-out, "add" the MICCAI 2018 version (also
    segmentation_models_pytorch), "mul" their product.

    Attributes:
      reduction: ratio r of the cSE bottleneck.
      aggregation: one of AGGREGATIONS.
      dtype: computation dtype; None computes in the input's dtype.
      param_dtype: dtype of the parameters.
    """

    reduction: int = 2
    aggregation: str = "max"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_reduction(self.reduction, type(self).__name__)
        check_aggregation(self.aggregation, type(self).__name__)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        check_feature_map(x, type(self).__name__)
        channel = ChannelSE(self.reduction, self.dtype, self.param_dtype, name="cse")(x)
        spatial = SpatialSE(self.dtype, self.param_dtype, name="sse")(x)
        return aggregate(channel, spatial, self.aggregation)


def aggregate(a: jnp.ndarray, b: jnp.ndarray, aggregation: str) -> jnp.ndarray:
    """Element-wise combination of two recalibrated feature maps."""
    check_aggregation(aggregation, "aggregate")
    if aggregation == "max":
        return jnp.maximum(a, b)
    if aggregation == "add":
        return a + b
    return a * b
