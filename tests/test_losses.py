"""The loss against a direct numpy computation, and its empty-class behaviour."""

import numpy as np
import pytest
import jax.numpy as jnp
from hypothesis import given, settings, strategies as st

from scse_jax import losses


def numpy_loss(logits, labels, weights, mask=None):
    logits = logits.astype(np.float64)
    mask = np.ones(len(labels)) if mask is None else mask
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    probs = np.exp(log_probs)
    pixel_mask = np.broadcast_to(mask[:, None, None], labels.shape)
    w = weights[labels] * pixel_mask
    ce = -(w * np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]).sum() / w.sum()
    dices = []
    for c in range(1, logits.shape[-1]):
        p = probs[..., c] * pixel_mask
        g = (labels == c) * pixel_mask
        dices.append((2 * (p * g).sum() + 1.0) / (p.sum() + g.sum() + 1.0))
    dice_loss = 1 - np.mean(dices)
    return ce + dice_loss, ce, dice_loss


@settings(deadline=None, max_examples=25)
@given(
    batch=st.integers(1, 3),
    side=st.integers(1, 6),
    classes=st.integers(2, 5),
    seed=st.integers(0, 2**16),
    masked=st.booleans(),
)
def test_loss_matches_numpy(batch, side, classes, seed, masked):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, side, side, classes)).astype(np.float32) * 3
    labels = rng.integers(0, classes, size=(batch, side, side))
    weights = rng.uniform(0.1, 5.0, size=classes).astype(np.float32)
    mask = np.ones(batch, np.float32)
    if masked and batch > 1:
        mask[-1] = 0.0
    total, parts = losses.segmentation_loss(
        jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights), example_mask=jnp.asarray(mask)
    )
    expected_total, expected_ce, expected_dice = numpy_loss(logits, labels, weights, mask)
    np.testing.assert_allclose(float(parts["cross_entropy"]), expected_ce, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(parts["dice_loss"]), expected_dice, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(total), expected_total, rtol=1e-4, atol=1e-5)


def test_weights_apply_before_reduction():
    # Two pixels, one per class; upweighting the badly-predicted class raises the CE.
    logits = jnp.array([[[[5.0, -5.0], [5.0, -5.0]]]])  # predicts class 0 everywhere
    labels = jnp.array([[[0, 1]]])
    even = losses.weighted_cross_entropy(logits, labels, jnp.array([1.0, 1.0]))
    rare_heavy = losses.weighted_cross_entropy(logits, labels, jnp.array([1.0, 9.0]))
    assert float(rare_heavy) > float(even) * 1.5


def test_absent_class_costs_nothing_when_not_predicted_and_something_when_predicted():
    labels = jnp.zeros((1, 4, 4), jnp.int32)
    quiet = jnp.zeros((1, 4, 4, 2)).at[..., 0].set(20.0)
    noisy = jnp.zeros((1, 4, 4, 2)).at[..., 1].set(20.0)
    assert float(losses.soft_dice_loss(quiet, labels)) < 1e-3
    assert float(losses.soft_dice_loss(noisy, labels)) > 0.9


def test_perfect_prediction_has_near_zero_dice_loss():
    labels = jnp.array([[[0, 1], [2, 1]]])
    logits = 30.0 * jnp.eye(3)[labels]
    assert float(losses.soft_dice_loss(logits, labels)) < 1e-3


def test_label_boundaries_mark_both_sides_of_an_edge_and_not_the_image_border():
    labels = np.zeros((1, 4, 5), np.int32)
    labels[0, :, 3:] = 2
    boundary = np.asarray(losses.label_boundaries(jnp.asarray(labels)))
    expected = np.zeros((1, 4, 5), np.float32)
    expected[0, :, 2:4] = 1.0  # the columns on either side of the 0 | 2 edge
    np.testing.assert_array_equal(boundary, expected)


def test_boundary_weight_adds_its_multiple_of_the_largest_class_weight_at_edges():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 5, 5))
    weights = np.array([0.5, 2.0, 4.0], np.float32)
    got = losses.weighted_cross_entropy(
        jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights), boundary_weight=2.0
    )
    edges = np.asarray(losses.label_boundaries(jnp.asarray(labels)))
    pixel_weights = weights[labels] + 2.0 * 4.0 * edges
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    true_log_prob = np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    expected = -(pixel_weights * true_log_prob).sum() / pixel_weights.sum()
    assert edges.sum() > 0
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_one_hot_shares_give_the_hard_label_loss():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 5, 5, 4)).astype(np.float32) * 3)
    labels = rng.integers(0, 4, size=(2, 5, 5))
    weights = jnp.asarray([0.5, 1.0, 2.0, 4.0])
    shares = jnp.asarray(np.eye(4, dtype=np.float32)[labels])
    hard, hard_parts = losses.segmentation_loss(logits, jnp.asarray(labels), weights, boundary_weight=1.0)
    soft, soft_parts = losses.segmentation_loss(logits, jnp.asarray(labels), weights, boundary_weight=1.0, shares=shares)
    for name in ("cross_entropy", "dice_loss"):
        np.testing.assert_allclose(float(soft_parts[name]), float(hard_parts[name]), rtol=1e-6)


def test_soft_cross_entropy_is_smallest_where_the_prediction_equals_the_shares():
    # A pixel three quarters liver: hard labels push its liver probability towards 1 (the
    # label) or 0; the shares' cross entropy has its minimum, zero gradient, at 0.75.
    shares = jnp.array([[[[0.25, 0.75]]]])
    labels = jnp.array([[[1]]])

    def loss_at(liver_probability):
        logits = jnp.log(jnp.array([[[[1 - liver_probability, liver_probability]]]]))
        return float(losses.weighted_cross_entropy(logits, labels, jnp.ones(2), shares=shares))

    values = {p: loss_at(p) for p in (0.55, 0.65, 0.75, 0.85, 0.95)}
    assert min(values, key=values.get) == 0.75
    np.testing.assert_allclose(values[0.75], -(0.25 * np.log(0.25) + 0.75 * np.log(0.75)), rtol=1e-6)


def test_soft_dice_counts_each_pixel_by_its_share():
    # Two pixels, 0.9 and 0.1 liver, predicted 0.5 liver each: the overlap is 0.5, the target's
    # liver 1.0; one-hot labels (liver, background) would give the same totals, so the predicted
    # side differs: 0.8 and 0.2 liver overlap the shares by 0.74, the labels by 0.8.
    shares = jnp.array([[[[0.1, 0.9], [0.9, 0.1]]]])
    labels = jnp.array([[[1, 0]]])
    logits = jnp.log(jnp.array([[[[0.2, 0.8], [0.8, 0.2]]]]))
    soft = float(losses.soft_dice_loss(logits, labels, shares=shares))
    np.testing.assert_allclose(soft, 1 - (2 * 0.74 + 1.0) / (1.0 + 1.0 + 1.0), rtol=1e-6)
    hard = float(losses.soft_dice_loss(logits, labels))
    np.testing.assert_allclose(hard, 1 - (2 * 0.8 + 1.0) / (1.0 + 1.0 + 1.0), rtol=1e-6)


def test_soft_cross_entropy_weighs_each_pixel_by_its_shares_class_weights():
    # Pixel weights are the share-weighted class weights: 0.25 * 1 + 0.75 * 3 = 2.5 for the
    # first pixel, 1 for the all-background second.
    shares = jnp.array([[[[0.25, 0.75], [1.0, 0.0]]]])
    labels = jnp.array([[[1, 0]]])
    logits = jnp.log(jnp.array([[[[0.5, 0.5], [0.9, 0.1]]]]))
    weights = jnp.array([1.0, 3.0])
    first, second = -np.log(0.5), -np.log(0.9)
    expected = (2.5 * first + 1.0 * second) / 3.5
    got = float(losses.weighted_cross_entropy(logits, labels, weights, shares=shares))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_pooled_targets_give_each_class_its_share_of_every_block():
    labels = np.zeros((1, 4, 4), np.int32)
    labels[0, :2, :2] = 1  # one whole block
    labels[0, 2, 2] = 2  # a quarter of another
    labels[0, :2, 2:] = [[1, 2], [2, 2]]  # a block three quarters class 2
    pooled_labels, shares = losses.pooled_targets(jnp.asarray(labels), 3, 2)
    np.testing.assert_allclose(shares[0, 0, 0], [0, 1, 0])
    np.testing.assert_allclose(shares[0, 0, 1], [0, 0.25, 0.75])
    np.testing.assert_allclose(shares[0, 1, 1], [0.75, 0, 0.25])
    np.testing.assert_array_equal(pooled_labels[0], [[1, 2], [0, 0]])
    np.testing.assert_allclose(np.asarray(shares).sum(-1), 1.0, rtol=1e-6)


def test_pooled_targets_refuse_a_side_that_does_not_pool():
    with pytest.raises(ValueError, match="does not pool by 4"):
        losses.pooled_targets(jnp.zeros((1, 6, 8), jnp.int32), 2, 4)


def test_deep_supervision_weights_halve_per_output_and_sum_to_one():
    assert losses.deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert losses.deep_supervision_weights(1) == [1.0]


def test_deep_supervision_loss_weighs_each_output_against_its_pooled_targets():
    rng = np.random.default_rng(0)
    labels = jnp.asarray(rng.integers(0, 3, size=(2, 8, 8)), jnp.int32)
    outputs = [jnp.asarray(rng.normal(size=(2, side, side, 3)), jnp.float32) for side in (8, 4, 2)]
    weights = jnp.array([1.0, 2.0, 3.0])
    total, parts = losses.deep_supervision_loss(outputs, labels, weights, boundary_weight=2.0)

    full, full_parts = losses.segmentation_loss(outputs[0], labels, weights, boundary_weight=2.0)
    expected = 4 / 7 * float(full)
    for logits, factor, share in zip(outputs[1:], (2, 4), (2 / 7, 1 / 7)):
        coarse_labels, coarse_shares = losses.pooled_targets(labels, 3, factor)
        loss, _ = losses.segmentation_loss(logits, coarse_labels, weights, shares=coarse_shares, boundary_weight=2.0)
        expected += share * float(loss)
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(parts["deep_supervision_loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(parts["loss"]) == pytest.approx(float(full_parts["loss"]), rel=1e-6)  # logged: the finest output's
    # one output is the plain loss, to the bit
    single, single_parts = losses.deep_supervision_loss(outputs[:1], labels, weights)
    assert float(single) == float(losses.segmentation_loss(outputs[0], labels, weights)[0])
    assert "deep_supervision_loss" not in single_parts
