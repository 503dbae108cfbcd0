"""Squeeze-and-excitation blocks (rank-generic) and the 2-D U-Net."""

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
