"""Squeeze-and-excitation blocks (rank-generic), the 2-D U-Net, its layers and its CPU convolution."""

from scse_jax.models.se import AGGREGATIONS, ChannelSE, ChannelSpatialSE, SpatialSE
from scse_jax.models.unet import SE_KINDS, SE_POSITIONS, UPSAMPLINGS, UNet, count_params

__all__ = [
    "AGGREGATIONS",
    "SE_KINDS",
    "SE_POSITIONS",
    "UPSAMPLINGS",
    "ChannelSE",
    "ChannelSpatialSE",
    "SpatialSE",
    "UNet",
    "count_params",
]
