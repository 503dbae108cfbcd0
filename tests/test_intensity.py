"""Tests of the intensity augmentation sets (data/intensity.py) and their use in augment_batch."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scse_jax.data import intensity
from scse_jax.data.pipeline import augment_batch
from scse_jax.errors import ConfigError


def _image(seed=0, shape=(32, 32, 1)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(exponent=st.floats(0.7, 1.5), seed=st.integers(0, 1000))
def test_gamma_keeps_mean_std_and_grey_level_order(exponent, seed):
    image = _image(seed)
    out = intensity.gamma(image.astype(np.float64), exponent)
    assert out.mean() == pytest.approx(image.mean(), abs=1e-5)
    assert out.std() == pytest.approx(image.std(), rel=1e-5)
    order = np.argsort(image.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= -1e-9)  # monotone: darker stays darker


def test_gamma_below_one_lifts_the_dark_tones_towards_the_bright_ones():
    ramp = np.linspace(0.0, 1.0, 101).reshape(101, 1, 1)
    out = intensity.gamma(ramp, 0.5)
    # Relative to the brightest tone, the darkest quarter comes closer after gamma 0.5.
    span = lambda x: (x[25] - x[0]) / (x[100] - x[0])  # noqa: E731
    assert span(out) > 1.5 * span(ramp)
    np.testing.assert_allclose(intensity.gamma(ramp, 1.0), ramp, atol=1e-6)


def test_contrast_scales_deviations_and_stays_in_the_input_range():
    image = _image(1).astype(np.float64)
    lower = intensity.contrast(image, 0.8)
    assert lower.std() == pytest.approx(0.8 * image.std())
    higher = intensity.contrast(image, 1.25)
    assert image.min() <= higher.min() and higher.max() <= image.max()
    np.testing.assert_allclose(intensity.contrast(image, 1.0), image)


def test_low_resolution_keeps_the_grid_and_removes_detail_finer_than_the_zoom():
    checkerboard = (np.indices((32, 32)).sum(axis=0) % 2).astype(np.float64)[..., None]
    out = intensity.low_resolution(checkerboard, 0.5)
    assert out.shape == checkerboard.shape
    assert out.std() < 0.05 * checkerboard.std()  # one pixel in two was kept: one colour
    smooth = np.tile(np.linspace(0, 1, 32), (32, 1))[..., None]
    np.testing.assert_allclose(intensity.low_resolution(smooth, 1.0), smooth, atol=1e-6)


def test_nnunet_set_is_reproducible_per_generator_and_treats_channels_alike(monkeypatch):
    image = np.repeat(_image(2), 3, axis=-1)
    monkeypatch.setattr(intensity, "NOISE", (1.0, (0.5, 0.5)))
    noise = intensity.nnunet(image, np.random.default_rng(0))
    assert not np.allclose(noise[..., 1], noise[..., 0])  # slices have their own noise
    monkeypatch.undo()
    first = intensity.nnunet(image, np.random.default_rng(5))
    again = intensity.nnunet(image, np.random.default_rng(5))
    assert first.dtype == np.float32 and first.shape == image.shape
    np.testing.assert_array_equal(first, again)
    changed = 0
    for seed in range(200):
        out = intensity.nnunet(image, np.random.default_rng(seed))
        changed += not np.allclose(out, image, atol=1e-6)
        if not np.allclose(out[..., 1], out[..., 0], atol=1e-5):  # only noise differs per slice
            monkeypatch.setattr(intensity, "NOISE", (0.0, (0.0, 0.0)))
            quiet = intensity.nnunet(image, np.random.default_rng(seed))
            monkeypatch.undo()
            np.testing.assert_allclose(quiet[..., 1], quiet[..., 0], atol=1e-5)
    # Each transform fires with nnU-Net's probability, independently.
    untouched = np.prod([1 - p for p, _ in (
        intensity.NOISE, intensity.BLUR, intensity.BRIGHTNESS, intensity.CONTRAST,
        intensity.LOW_RESOLUTION, intensity.GAMMA_INVERTED, intensity.GAMMA)])
    assert abs(changed / 200 - (1 - untouched)) < 0.12


def _batch():
    rng = np.random.default_rng(0)
    labels = np.zeros((6, 32, 32), np.int32)
    labels[:, 10:20, 4:12] = 1
    return {"image": rng.normal(size=(6, 32, 32, 1)).astype(np.float32), "label": labels}


def test_augment_batch_nnunet_set_moves_labels_as_the_jitter_set_and_changes_only_intensities():
    def generators():
        return [np.random.default_rng(seed) for seed in range(6)]

    jittered = augment_batch(_batch(), generators(), modality="MR")
    nnunet = augment_batch(_batch(), generators(), modality="MR", intensity_set="nnunet")
    np.testing.assert_array_equal(nnunet["label"], jittered["label"])
    assert nnunet["image"].dtype == np.float32 and nnunet["image"].shape == jittered["image"].shape
    assert not np.allclose(nnunet["image"], jittered["image"])
    np.testing.assert_array_equal(
        nnunet["image"], augment_batch(_batch(), generators(), modality="MR", intensity_set="nnunet")["image"]
    )


def test_augment_batch_refuses_an_unknown_intensity_set():
    with pytest.raises(ConfigError, match="jitter.*nnunet.*gin"):
        augment_batch(_batch(), np.random.default_rng(0), modality="MR", intensity_set="strong")


@pytest.mark.parametrize("size, width_in, width_out", [(1, 1, 2), (3, 2, 2), (3, 1, 3), (5, 2, 1)])
def test_correlate_channels_is_a_zero_padded_correlation_summed_over_input_channels(size, width_in, width_out):
    from scipy import ndimage

    rng = np.random.default_rng(size * 10 + width_in)
    x = rng.normal(size=(9, 7, width_in))
    kernels = rng.normal(size=(width_out, width_in, size, size))
    expected = np.stack([
        sum(ndimage.correlate(x[..., i], kernels[o, i], mode="constant") for i in range(width_in))
        for o in range(width_out)
    ], axis=-1)
    np.testing.assert_allclose(intensity.correlate_channels(x, kernels), expected, rtol=1e-12, atol=1e-12)


def test_gin_keeps_shape_norm_and_seed_and_can_reverse_which_tissue_is_brighter():
    image = _image(3, (32, 32, 2))
    first = intensity.gin(image, np.random.default_rng(4))
    assert first.shape == image.shape and first.dtype == np.float32
    np.testing.assert_array_equal(first, intensity.gin(image, np.random.default_rng(4)))
    assert np.linalg.norm(first) == pytest.approx(np.linalg.norm(image), rel=1e-4)
    # Two flat "tissues": over random networks, the darker one sometimes comes out brighter.
    tissues = np.zeros((32, 32, 1))
    tissues[:, :16], tissues[:, 16:] = -1.0, 1.0
    reversed_count = 0
    for seed in range(40):
        out = intensity.gin(tissues, np.random.default_rng(seed))[4:-4, 4:-4, 0]
        reversed_count += out[:, :8].mean() > out[:, -8:].mean()
    assert 0 < reversed_count < 40


def test_augment_batch_gin_set_is_the_jitter_then_random_networks_on_about_half_the_examples():
    def generators(count=40):
        return [np.random.default_rng(seed) for seed in range(count)]

    batch = {"image": np.random.default_rng(0).normal(size=(40, 16, 16, 1)).astype(np.float32),
             "label": np.zeros((40, 16, 16), np.int32)}  # fmt: skip
    jittered = augment_batch(batch, generators(), modality="MR")
    gin = augment_batch(batch, generators(), modality="MR", intensity_set="gin")
    np.testing.assert_array_equal(gin["label"], jittered["label"])
    changed = [not np.array_equal(g, j) for g, j in zip(gin["image"], jittered["image"])]
    assert 8 <= sum(changed) <= 32  # probability 0.5 each
    for example in np.flatnonzero(~np.array(changed)):
        np.testing.assert_array_equal(gin["image"][example], jittered["image"][example])


def _organs():
    """A 48 x 48 slice: body 1.0 on air -2.0, a bright liver (2.0, class 1) on the left, a
    spleen (2.0, class 4) on the right, a right kidney (1.5, class 2) at the bottom."""
    image = np.full((48, 48, 1), -2.0)
    label = np.zeros((48, 48), np.int32)
    image[4:44, 4:44] = 1.0
    for cls, rows, cols, value in ((1, slice(8, 24), slice(8, 22), 2.0), (4, slice(8, 20), slice(30, 40), 2.0),
                                   (2, slice(32, 40), slice(10, 18), 1.5)):
        image[rows, cols], label[rows, cols] = value, cls
    return image, label


def test_organ_signal_loss_darkens_liver_spleen_or_both_and_nothing_far_from_them():
    image, label = _organs()
    darkened = {"liver": 0, "spleen": 0}
    for seed in range(30):
        out = intensity.organ_signal_loss(image, label, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.float32
        np.testing.assert_array_equal(out[32:40, 10:18], image[32:40, 10:18])  # the kidney
        np.testing.assert_array_equal(out[:2], image[:2])  # the air
        for organ, cls in (("liver", 1), ("spleen", 4)):
            inside = label == cls
            moved = image[inside].mean() - out[inside].mean()
            assert moved >= 0
            if moved > 0:
                darkened[organ] += 1
                # 0.5-0.95 of the way to the slice's dark level, the softened outline aside.
                assert 0.3 * (2.0 + 2.0) < moved <= 0.95 * (2.0 + 2.0)
    assert darkened["liver"] >= 5 and darkened["spleen"] >= 5 and darkened["liver"] + darkened["spleen"] > 30


def test_organ_signal_loss_leaves_a_slice_without_the_organs_alone():
    image, label = _organs()
    label[label == 1] = label[label == 4] = 0
    np.testing.assert_array_equal(intensity.organ_signal_loss(image, label, np.random.default_rng(0)), image)


def test_augment_batch_darkens_organs_on_the_share_asked_and_draws_nothing_when_off():
    def generators(count=40):
        return [np.random.default_rng(seed) for seed in range(count)]

    image, label = _organs()
    batch = {"image": np.repeat(image[None], 40, 0).astype(np.float32), "label": np.repeat(label[None], 40, 0)}
    plain = augment_batch(batch, generators(), modality="MR")
    np.testing.assert_array_equal(plain["image"], augment_batch(batch, generators(), modality="MR", organ_signal_loss=0.0)["image"])
    for share, low, high in ((1.0, 40, 40), (0.25, 3, 20)):
        dark = augment_batch(batch, generators(), modality="MR", organ_signal_loss=share)
        np.testing.assert_array_equal(dark["label"], plain["label"])
        darker = [
            any((d[lab == cls] < p[lab == cls] - 0.5).mean() > 0.5 for cls in (1, 4))
            for d, p, lab in zip(dark["image"][..., 0], plain["image"][..., 0], dark["label"])
        ]
        assert low <= sum(darker) <= high
