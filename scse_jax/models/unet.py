"""A 2-D U-Net with optional squeeze-and-excitation blocks after chosen blocks (encoder
and decoder by default, as in the report).

The U-Net is 2-D (NHWC); the SE blocks in se.py are rank-generic. Its building blocks are in
layers.py; the 3x3 convolution is passed in by the model's builder (cpu_ops.select_conv3x3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from scse_jax.models.layers import Conv3x3, max_pool2x2, upsample2x_bilinear
from scse_jax.models.se import (
    ChannelSE,
    ChannelSpatialSE,
    SpatialSE,
    check_aggregation,
    check_reduction,
)

SE_KINDS = ("none", "cse", "sse", "scse")
SE_POSITIONS = ("encoder", "bottleneck", "decoder")
# The report's placement, and configs/default.py's.
DEFAULT_SE_POSITIONS = ("encoder", "decoder")
UPSAMPLINGS = ("bilinear", "transpose")
DEPTH = 4  # encoder blocks; every input side must be divisible by 2**DEPTH
BATCH_NORM_MOMENTUM = 0.9
# With deep supervision, the decoder blocks whose output also gets a 1x1 head (1/2 and 1/4 of the
# input side). nnU-Net supervises every decoder resolution but the lowest, which here is dec4's.
DEEP_SUPERVISION_LEVELS = (2, 3)
DEEP_SUPERVISION = "deep_supervision"  # the variable collection the auxiliary logits are sown into

Dtype = Any
ModuleDef = Any


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or jax.ShapeDtypeStruct."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def auxiliary_logits(collections: dict[str, Any]) -> list[jnp.ndarray]:
    """The deep-supervision logits a train-mode apply sowed (`UNet.deep_supervision`), finest
    first; empty where the model has none or the collection was not mutable."""
    sown = collections.get(DEEP_SUPERVISION, {})
    return [sown[_sown_name(level)] for level in DEEP_SUPERVISION_LEVELS if _sown_name(level) in sown]


def _sown_name(level: int) -> str:
    return f"dec{level}_logits"


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


class DoubleConv(nn.Module):
    """(conv3x3 -> BatchNorm -> ReLU) twice.

    Attributes:
      features: output channels of both convolutions.
      dtype: operand dtype of the convolutions, which accumulate and return float32.
      conv: the 3x3 convolution module.
    """

    features: int
    dtype: Dtype = jnp.float32
    conv: ModuleDef = Conv3x3

    @nn.compact
    def __call__(self, *inputs: jnp.ndarray, train: bool) -> jnp.ndarray:
        """The first convolution reads the channel concatenation of the inputs."""
        for i in (1, 2):
            x = self.conv(self.features, use_bias=False, dtype=self.dtype, name=f"conv{i}")(*inputs)
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
      dtype: operand dtype of the convolutions. The 3x3 ones accumulate and return float32;
        the transposed one returns ``dtype``, cast to float32 after that rounding.
      conv: the 3x3 convolution module.
    """

    features: int
    upsample: str = "bilinear"
    dtype: Dtype = jnp.float32
    conv: ModuleDef = Conv3x3

    @nn.compact
    def __call__(self, x: jnp.ndarray, skip: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if self.upsample == "transpose":
            x = nn.ConvTranspose(
                self.features, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                name="up",
            )(x).astype(jnp.float32)
        else:
            x = upsample2x_bilinear(x)
            x = self.conv(self.features, dtype=self.dtype, name="up")(x)
        return DoubleConv(self.features, dtype=self.dtype, conv=self.conv, name="conv")(skip, x, train=train)


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
      se_positions: any of "encoder", "bottleneck", "decoder"; by default encoder and decoder,
        the report's placement and configs/default.py's.
      upsample: "bilinear" or "transpose".
      deep_supervision: also map the outputs of the DEEP_SUPERVISION_LEVELS decoder blocks to
        logits by 1x1 convolutions and sow them into the DEEP_SUPERVISION collection (read them
        with `auxiliary_logits`); the returned logits are the same either way.
      dtype: operand dtype of the 3x3 and transposed convolutions (e.g. bfloat16 for GPU tensor
        cores). The 3x3 convolutions accumulate and return float32; the transposed ones (with
        upsample="transpose") return ``dtype``, cast to float32 after that rounding. Everything
        else (BatchNorm, SE blocks, the head, the gradients' reductions) computes in float32:
        with bfloat16 throughout, the reductions behind the bias, BatchNorm and SE gradients
        lose much of the gradient's precision (measured in benchmarks/README.md).
      conv: the 3x3 convolution module (`layers.Conv3x3` or a subclass with its parameters,
        such as `cpu_ops.CpuConv3x3`), chosen by the model's builder for the hardware.
    """

    num_classes: int
    features: int = 16
    se: str = "none"
    se_reduction: int = 2
    se_aggregation: str = "max"
    se_positions: Sequence[str] = DEFAULT_SE_POSITIONS
    upsample: str = "bilinear"
    deep_supervision: bool = False
    dtype: Dtype = jnp.float32
    conv: ModuleDef = Conv3x3

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
            x = DoubleConv(width, dtype=self.dtype, conv=self.conv, name=name)(x, train=train)
            x = self._se("encoder", name)(x)
            skips.append(x)
            x = max_pool2x2(x)
        bottleneck_width = self.features * 2**DEPTH
        x = DoubleConv(bottleneck_width, dtype=self.dtype, conv=self.conv, name="bottleneck")(x, train=train)
        x = self._se("bottleneck", "bottleneck")(x)
        for level in range(DEPTH, 0, -1):
            name = f"dec{level}"
            width = self.features * 2 ** (level - 1)
            x = UpBlock(width, self.upsample, dtype=self.dtype, conv=self.conv, name=name)(
                x, skips[level - 1], train=train
            )
            x = self._se("decoder", name)(x)
            if self.deep_supervision and level in DEEP_SUPERVISION_LEVELS:
                head = nn.Conv(self.num_classes, (1, 1), dtype=jnp.float32, name=f"{name}_head")
                # Kept, not appended: a collection passed in (such as init's) cannot stand in for this call's.
                self.sow(
                    DEEP_SUPERVISION, _sown_name(level), head(x).astype(jnp.float32),
                    reduce_fn=lambda _, new: new, init_fn=lambda: None,
                )
        logits = nn.Conv(self.num_classes, (1, 1), dtype=jnp.float32, name="head")(x)
        return logits.astype(jnp.float32)

