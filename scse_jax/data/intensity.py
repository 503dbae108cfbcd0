"""Intensity augmentation: how bright, how contrasted, how sharp and how noisy a slice is.

Three sets (`data.intensity_augmentation`):
  "jitter": contrast x U(0.9, 1.1) and brightness + U(-b, b) on every example (applied in
      `pipeline.augment_batch`); the earlier default, kept so that earlier runs reproduce.
  "nnunet": nnU-Net's default intensity transforms, each drawn per example with nnU-Net's
      probability (Isensee et al., Nature Methods 2021; the `get_training_transforms` list of
      nnU-Net v2 and batchgenerators' color/noise/resample augmentations): Gaussian noise,
      Gaussian blur, multiplicative brightness, contrast, simulated low resolution, and gamma
      (also on the inverted image), the last keeping the example's mean and std. A model that
      reads organs from their absolute grey level fails on a patient whose organs are darker
      or brighter than the training patients'; these transforms take that cue away.
  "gin": the jitter, then, on half of the examples, a global intensity non-linear transform
      (GIN; Ouyang et al., "Causality-inspired single-source domain generalization for medical
      image segmentation", IEEE TMI 2022): a shallow convolutional network with random weights,
      drawn anew for every example, whose output is mixed with the image and rescaled to its
      norm. Unlike a gamma it can reverse which of two tissues is brighter, so that an organ
      has to be found by its shape and place rather than its grey level.

Apart from these sets, `data.organ_signal_loss` darkens the liver, the spleen or both on a share
of MR examples (`organ_signal_loss`), as iron overload does on T2-weighted images.

Every transform acts on one example, all of its channels alike, except the noise: the channels
of a 2.5-D input are neighbouring slices of one volume, which share one contrast and
resolution but each have their own noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

INTENSITY_AUGMENTATIONS = ("jitter", "nnunet", "gin")

JITTER_CONTRAST = (0.9, 1.1)
JITTER_BRIGHTNESS = {"CT": 0.05, "MR": 0.1}  # CT lies in [0, 1], MR is z-scored

# nnU-Net v2 defaults: (probability per example, range).
NOISE = (0.1, (0.0, 0.1))  # standard deviation of the added noise, in normalised units
BLUR = (0.2, (0.5, 1.0))  # Gaussian sigma in pixels (nnU-Net: each channel with p 0.5)
BRIGHTNESS = (0.15, (0.75, 1.25))  # multiplier
CONTRAST = (0.15, (0.75, 1.25))  # factor about the mean, result clipped to the input's range
LOW_RESOLUTION = (0.25, (0.5, 1.0))  # zoom of the nearest-neighbour downsampling
GAMMA_INVERTED = (0.1, (0.7, 1.5))
GAMMA = (0.3, (0.7, 1.5))

GIN_PROBABILITY = 0.5
GIN_LAYERS = 4  # as Ouyang et al.'s released code: 4 layers, 2 channels between them,
GIN_WIDTH = 2  # each layer's kernel 1x1 or 3x3 at random, leaky ReLU but after the last
GIN_KERNELS = (1, 3)

# Iron deposition darkens organs on T2-weighted MR: the liver (and pancreas) in idiopathic
# haemochromatosis, liver and spleen in transfusional siderosis (Siegelman, Mitchell & Semelka,
# "Abdominal iron deposition: metabolism, MR findings, and clinical importance", Radiology
# 1996). Class ids of types.CLASS_NAMES.
SIGNAL_LOSS_ORGANS = ((1,), (4,), (1, 4))  # liver, spleen, both: one drawn per example
SIGNAL_LOSS_STRENGTH = (0.5, 0.95)  # fraction of the way from the organ's grey level to the dark level
SIGNAL_LOSS_DARK_PERCENTILE = 1  # of the slice: the air around the body
SIGNAL_LOSS_EDGE_SIGMA = 1.5  # pixels; a soft outline, so that no artificial edge marks the organ


def nnunet(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """nnU-Net's intensity transforms on one (rows, cols, channels) example, in its order."""
    image = np.asarray(image, np.float64)
    if rng.uniform() < NOISE[0]:
        image = image + rng.normal(0.0, rng.uniform(*NOISE[1]), image.shape)
    if rng.uniform() < BLUR[0]:
        image = ndimage.gaussian_filter(image, sigma=(rng.uniform(*BLUR[1]),) * 2 + (0,))
    if rng.uniform() < BRIGHTNESS[0]:
        image = image * rng.uniform(*BRIGHTNESS[1])
    if rng.uniform() < CONTRAST[0]:
        image = contrast(image, _either_side_of_one(rng, CONTRAST[1]))
    if rng.uniform() < LOW_RESOLUTION[0]:
        image = low_resolution(image, rng.uniform(*LOW_RESOLUTION[1]))
    if rng.uniform() < GAMMA_INVERTED[0]:
        image = -gamma(-image, _either_side_of_one(rng, GAMMA_INVERTED[1]))
    if rng.uniform() < GAMMA[0]:
        image = gamma(image, _either_side_of_one(rng, GAMMA[1]))
    return image.astype(np.float32)


def _either_side_of_one(rng: np.random.Generator, value_range: tuple[float, float]) -> float:
    """As batchgenerators draws factors: below and above 1 equally often."""
    low, high = value_range
    if low < 1 and rng.uniform() < 0.5:
        return rng.uniform(low, 1.0)
    return rng.uniform(max(low, 1.0), high)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Scales the deviations from the mean by ``factor``, clipped to the input's range."""
    mean = image.mean()
    return np.clip((image - mean) * factor + mean, image.min(), image.max())


def low_resolution(image: np.ndarray, zoom: float) -> np.ndarray:
    """Nearest-neighbour downsampling by ``zoom``, then cubic upsampling back to the grid."""
    rows, cols = image.shape[:2]
    small = (max(1, round(rows * zoom)), max(1, round(cols * zoom)))
    down = ndimage.zoom(image, (small[0] / rows, small[1] / cols, 1), order=0, grid_mode=True, mode="nearest")
    return ndimage.zoom(
        down, (rows / down.shape[0], cols / down.shape[1], 1), order=3, grid_mode=True, mode="nearest"
    )


def gamma(image: np.ndarray, exponent: float, epsilon: float = 1e-7) -> np.ndarray:
    """Gamma on the image mapped to [0, 1], mapped back, then its mean and std restored."""
    low, spread = image.min(), image.max() - image.min()
    mean, std = image.mean(), image.std()
    out = ((image - low) / (spread + epsilon)) ** exponent * (spread + epsilon) + low
    out_std = out.std()
    if out_std > 0:
        out = (out - out.mean()) / out_std * std
    return out - out.mean() + mean


def gin(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random shallow network's output on one (rows, cols, channels) example, mixed with it.

    Layers of Gaussian random kernels and shifts (leaky ReLU between them), channels ->
    GIN_WIDTH -> ... -> channels; out = a * net(x) + (1 - a) * x with a ~ U(0, 1), scaled to
    the Frobenius norm of x.
    """
    image = np.asarray(image, np.float64)
    channels = image.shape[-1]
    widths = [channels] + [GIN_WIDTH] * (GIN_LAYERS - 1) + [channels]
    x = image
    for layer, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        size = GIN_KERNELS[rng.integers(len(GIN_KERNELS))]
        kernels = rng.normal(size=(width_out, width_in, size, size))
        shifts = rng.normal(size=width_out)
        out = shifts + correlate_channels(x, kernels)
        x = out if layer == GIN_LAYERS - 1 else np.where(out > 0, out, 0.01 * out)
    alpha = rng.uniform()
    mixed = alpha * x + (1 - alpha) * image
    return (mixed * (np.linalg.norm(image) / (np.linalg.norm(mixed) + 1e-5))).astype(np.float32)


def correlate_channels(x: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """A convolution layer's correlation, zero-padded to the same size: (rows, cols, in) with
    (out, in, k, k) kernels, k odd, -> (rows, cols, out); one matrix product per kernel tap."""
    size = kernels.shape[-1]
    pad = size // 2
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    rows, cols = x.shape[:2]
    out = np.zeros((rows, cols, kernels.shape[0]))
    for dy in range(size):
        for dx in range(size):
            out += padded[dy : dy + rows, dx : dx + cols] @ kernels[:, :, dy, dx].T
    return out


def organ_signal_loss(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Darkens the liver, the spleen or both of one (rows, cols, channels) example.

    Inside the organs' softened outline (from ``label``, the example's class map) every channel
    moves a random fraction of the way to the slice's dark level; outside it the image is
    unchanged. The neighbouring slices of a 2.5-D input take the centre slice's outline.
    """
    organs = SIGNAL_LOSS_ORGANS[rng.integers(len(SIGNAL_LOSS_ORGANS))]
    strength = rng.uniform(*SIGNAL_LOSS_STRENGTH)
    inside = np.isin(label, organs)
    if not inside.any():
        return np.asarray(image, np.float32)
    weight = ndimage.gaussian_filter(inside.astype(np.float64), SIGNAL_LOSS_EDGE_SIGMA)[..., None]
    dark = np.percentile(image, SIGNAL_LOSS_DARK_PERCENTILE)
    return (image - strength * weight * (image - dark)).astype(np.float32)
