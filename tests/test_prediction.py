"""The one prediction path: fixed-size padded batches, one compilation per output kind, labels
that agree with probabilities and with the loss-reporting validation step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from scse_jax import losses, prediction, sharding
from scse_jax.errors import ConfigError
from scse_jax.state import build_model

LOSS_WEIGHTS = {"ce_weight": 1.0, "dice_weight": 1.0, "boundary_weight": 0.0}


@pytest.fixture(scope="module")
def predictor_and_variables():
    config = default.get_config()
    config.model.features = 4
    model = build_model(config.model, 3)
    mesh = sharding.make_data_mesh()
    predictor = prediction.Predictor(model, mesh, batch_size=8, image_size=32, context_slices=1)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    return predictor, jax.device_put(variables, sharding.replicated_sharding(mesh))


def test_fixed_size_batches_pad_the_last_and_mark_the_padding():
    arrays = {"image": np.arange(10, dtype=np.float32)[:, None], "label": np.arange(10)[:, None]}
    batches = list(prediction.fixed_size_batches(arrays, 4))
    assert [b["valid"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert batches[-1]["image"][:, 0].tolist() == [8, 9, 0, 0] and all(b["image"].shape == (4, 1) for b in batches)


def test_any_number_of_slices_reuses_one_compilation_per_output(predictor_and_variables):
    predictor, variables = predictor_and_variables
    images = np.random.default_rng(0).normal(size=(13, 32, 32)).astype(np.float32)
    before = predictor.traces
    labels = predictor.predict(variables, images)
    assert labels.shape == (13, 32, 32) and labels.dtype == np.uint8
    # the same slices and neighbours (slice 2's next neighbour is itself in the shorter volume)
    np.testing.assert_array_equal(predictor.predict(variables, images[:3])[:2], labels[:2])
    assert predictor.traces == before + 1
    probs = predictor.predict(variables, images, probabilities=True)
    assert probs.shape == (13, 32, 32, 3) and probs.dtype == np.float32
    np.testing.assert_array_equal(probs.argmax(-1), labels)
    assert predictor.traces == before + 2
    assert predictor.predict(variables, images[:0]).shape == (0, 32, 32)


def test_validation_step_predicts_what_prediction_does_and_weights_each_batch_loss_by_its_real_slices(
    predictor_and_variables,
):
    predictor, variables = predictor_and_variables
    rng = np.random.default_rng(1)
    images = rng.normal(size=(11, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 3, size=(11, 32, 32)).astype(np.uint8)
    weights = jax.device_put(jnp.ones(3), sharding.replicated_sharding(predictor.mesh))
    predicted, sums, count = predictor.predict_with_loss(variables, images, labels, weights, LOSS_WEIGHTS)
    np.testing.assert_allclose(predicted, predictor.predict(variables, images, probabilities=True), rtol=1e-6)
    assert count == 11 and set(sums) == {"loss", "cross_entropy", "dice_loss"}
    assert sums["loss"] == pytest.approx(sums["cross_entropy"] + sums["dice_loss"], rel=1e-5)
    # Each part is a batch loss (Dice pooled over the batch) times the batch's real rows, so it
    # depends on the batch size: 8 * loss(slices 0-7) + 3 * loss(slices 8-10).
    all_logits = predictor.model.apply(variables, predictor.network_input(images), train=False)
    batch_losses = [
        float(losses.segmentation_loss(all_logits[rows], jnp.asarray(labels[rows], jnp.int32), jnp.ones(3),
                                       **LOSS_WEIGHTS)[1]["dice_loss"])
        for rows in (slice(0, 8), slice(8, 11))
    ]
    assert sums["dice_loss"] == pytest.approx(8 * batch_losses[0] + 3 * batch_losses[1], rel=1e-4)
    # Padding rows add nothing: one slice alone gives its own loss, whatever the padding holds.
    _, one, one_count = predictor.predict_with_loss(variables, images[:1], labels[:1], weights, LOSS_WEIGHTS)
    logits = predictor.model.apply(variables, predictor.network_input(images[:1]), train=False)
    _, expected = losses.segmentation_loss(logits, jnp.asarray(labels[:1], jnp.int32), jnp.ones(3), **LOSS_WEIGHTS)
    assert one_count == 1 and one["loss"] == pytest.approx(float(expected["loss"]), rel=1e-4)


def test_class_ids_are_the_argmax_of_the_logits_where_softmax_would_tie():
    from types import SimpleNamespace

    # Class 1 wins by 1e-9, less than float32's resolution of softmax probabilities near 1/2.
    logits = jnp.zeros((1, 2, 2, 2), jnp.float32).at[..., 1].set(1e-9)
    model = SimpleNamespace(apply=lambda variables, images, train: logits)
    images = jnp.zeros((1, 2, 2, 1), jnp.float32)
    assert prediction.predict_step({}, images, model=model, probabilities=False).tolist() == [[[1, 1], [1, 1]]]


def test_test_time_shifts_average_probabilities(predictor_and_variables):
    predictor, variables = predictor_and_variables
    images = np.random.default_rng(2).normal(size=(4, 32, 32)).astype(np.float32)
    tta = predictor.predict(variables, images, probabilities=True, tta=True)
    np.testing.assert_allclose(tta.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(predictor.predict(variables, images, tta=True), tta.argmax(-1))
    assert not np.allclose(tta, predictor.predict(variables, images, probabilities=True))


def test_wrong_grid_or_channels_are_config_errors(predictor_and_variables):
    predictor, variables = predictor_and_variables
    with pytest.raises(ConfigError, match=r"expects \(N, 32, 32\) or \(N, 32, 32, 3\) slices, got \(2, 48, 48\)"):
        predictor.predict(variables, np.zeros((2, 48, 48), np.float32))
    with pytest.raises(ConfigError, match="got"):
        predictor.predict(variables, np.zeros((2, 32, 32, 1), np.float32))
