"""Eval-mode prediction of whole cases: the one path from slices to class ids or probabilities.

Validation during training, ``evaluate --checkpoint``, ``predict``, ``experiment`` and
``Segmenter`` all predict through `Predictor`: slices (each with its `data.context_slices`
neighbours as channels) go through the network in batches of one fixed size, the last one
padded, so any number of slices reuses one compiled function; `postprocess.to_native` then
brings class probabilities back to the native grid as class ids.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from scse_jax import compilation, losses, sharding
from scse_jax.data import pipeline
from scse_jax.errors import ConfigError, DataError

# Test-time shifts in pixels of the training grid: small translations respect anatomy,
# unlike left-right flips, which swap the kidneys. They are circular (jnp.roll): the rows
# shifted out of one edge come back in at the other.
TTA_SHIFTS = ((0, 0), (4, 0), (-4, 0), (0, 4), (0, -4))


def _probabilities(variables, images, logits, *, model, tta: bool) -> jax.Array:
    """Class probabilities (B, H, W, C) from the unshifted ``logits``, averaged with those of the
    shifted images when ``tta``."""
    total = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    for dy, dx in TTA_SHIFTS[1:] if tta else ():
        shifted = model.apply(variables, jnp.roll(images, (dy, dx), axis=(1, 2)), train=False)
        total = total + jnp.roll(jax.nn.softmax(shifted.astype(jnp.float32), axis=-1), (-dy, -dx), axis=(1, 2))
    return total / (len(TTA_SHIFTS) if tta else 1)


def _class_ids(variables, images, logits, *, model, tta: bool) -> jax.Array:
    """Class ids (B, H, W) uint8: the argmax of the logits, or with ``tta`` of the averaged
    probabilities."""
    scores = _probabilities(variables, images, logits, model=model, tta=True) if tta else logits
    return jnp.argmax(scores, axis=-1).astype(jnp.uint8)


def predict_step(variables: dict[str, Any], images: jax.Array, *, model, probabilities: bool, tta: bool = False):
    """Eval-mode class probabilities (B, H, W, C) float32, or class ids (B, H, W) uint8;
    averaged over TTA_SHIFTS when ``tta``."""
    logits = model.apply(variables, images, train=False)
    if probabilities:
        return _probabilities(variables, images, logits, model=model, tta=tta)
    return _class_ids(variables, images, logits, model=model, tta=tta)


def eval_step(
    variables: dict[str, Any],
    batch: dict[str, jax.Array],
    class_weights: jax.Array,
    *,
    model,
    **loss_weights: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`predict_step`'s class probabilities, and the loss over the batch's valid rows
    (``batch["valid"]``), with `losses.segmentation_loss`'s ``loss_weights`` (`train.loss_settings`)."""
    logits = model.apply(variables, batch["image"], train=False)
    _, parts = losses.segmentation_loss(
        logits, batch["label"], class_weights, example_mask=batch["valid"], **loss_weights
    )
    return _probabilities(variables, batch["image"], logits, model=model, tta=False), parts


def fixed_size_batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Cuts arrays into batches of exactly ``batch_size``, padding the last with zeros.

    Every batch carries ``valid`` (1 for real rows, 0 for padding), so one compiled function
    serves any number of slices.
    """
    count = len(next(iter(arrays.values())))
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        batch = {}
        for name, array in arrays.items():
            chunk = array[start:stop]
            if stop - start < batch_size:
                pad = np.zeros((batch_size - (stop - start),) + chunk.shape[1:], chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            batch[name] = chunk
        batch["valid"] = (np.arange(batch_size) < stop - start).astype(np.float32)
        yield batch


def gather_to_host(array: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host) sharded array, on every host."""
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


class Predictor:
    """One network's jitted eval-mode prediction over slices, batched and sharded over a mesh.

    Attributes:
      model: the network (`state.build_model`).
      mesh: the device mesh; batches are split over its data axis, variables replicated.
      batch_size: slices per global batch (a multiple of the mesh's device count).
      image_size: S of the (S, S) training grid.
      context_slices: neighbours on either side read as channels (``data.context_slices``).
      traces: how many times a prediction function was traced (= compiled).
    """

    def __init__(self, model, mesh: jax.sharding.Mesh, *, batch_size: int, image_size: int, context_slices: int = 0):
        sharding.check_batch_size(batch_size, mesh)
        self.model = model
        self.mesh = mesh
        self.batch_size = batch_size
        self.image_size = image_size
        self.context_slices = context_slices
        self.traces = 0
        self._compiled: dict[tuple, Any] = {}

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def _jitted(self, step, **static):
        key = (step.__name__, tuple(sorted(static.items())))
        if key not in self._compiled:

            def counted(*args):
                self.traces += 1
                return step(*args, model=self.model, **static)

            replicated = sharding.replicated_sharding(self.mesh)
            batch = sharding.batch_sharding(self.mesh)
            with_loss = step is eval_step
            self._compiled[key] = jax.jit(
                counted,
                in_shardings=(replicated, batch, replicated) if with_loss else (replicated, batch),
                out_shardings=(batch, replicated) if with_loss else batch,
                compiler_options=compilation.step_compiler_options(),
            )
        return self._compiled[key]

    def network_input(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S) consecutive slices of one volume, or (N, S, S, C) slices already stacked
        with their neighbours (`pipeline.with_context`) -> (N, S, S, C) float32, checked."""
        images = np.asarray(images, np.float32)
        size, channels = self.image_size, 2 * self.context_slices + 1
        if images.ndim == 3 and images.shape[1:] == (size, size):
            images = pipeline.with_context(images, self.context_slices)
        if images.ndim != 4 or images.shape[1:] != (size, size, channels):
            raise ConfigError(
                f"prediction expects (N, {size}, {size}) or (N, {size}, {size}, {channels}) slices, got {images.shape}"
            )
        if not np.all(np.isfinite(images)):  # the network would return background there, silently
            raise DataError("the input holds non-finite values (NaN or infinity); training refuses such volumes too")
        return images

    def _run(self, function, variables, arrays: dict[str, np.ndarray], *extra) -> Iterator[tuple[Any, int]]:
        """(outputs, valid rows) of ``function`` per fixed-size batch of ``arrays``; every process
        feeds its share of each global batch."""
        share = slice(
            jax.process_index() * self.batch_size // jax.process_count(),
            (jax.process_index() + 1) * self.batch_size // jax.process_count(),
        )
        for batch in fixed_size_batches(arrays, self.batch_size):
            local = {name: value[share] for name, value in batch.items()}
            device_batch = sharding.shard_batch(local, self.mesh)
            inputs = device_batch if extra else device_batch["image"]
            yield function(variables, inputs, *extra), int(batch["valid"].sum())

    def predict(self, variables, images: np.ndarray, *, probabilities: bool = False, tta: bool = False) -> np.ndarray:
        """Class ids (N, S, S) uint8, or probabilities (N, S, S, C) float32, on the training grid.

        Args:
          variables: the network's params and batch_stats.
          images: see `network_input`.
          probabilities: return class probabilities instead of class ids.
          tta: average over small shifts (anatomy-preserving test-time augmentation).
        """
        images = self.network_input(images)
        if not len(images):
            shape = images.shape[:3] + ((self.num_classes,) if probabilities else ())
            return np.zeros(shape, np.float32 if probabilities else np.uint8)
        function = self._jitted(predict_step, probabilities=probabilities, tta=tta)
        pieces = [gather_to_host(out)[:valid] for out, valid in self._run(function, variables, {"image": images})]
        return np.concatenate(pieces)

    def predict_with_loss(
        self, variables, images: np.ndarray, labels: np.ndarray, class_weights: jax.Array, loss_weights: dict
    ) -> tuple[np.ndarray, dict[str, float], int]:
        """Class probabilities (N, S, S, C) float32 of labelled slices, the loss parts summed
        over batches, and the slice count.

        Each part (`losses.segmentation_loss`, weighted by ``loss_weights``) is a batch loss,
        cross entropy normalised over the batch and soft Dice pooled over it, multiplied by the
        batch's real rows; the sum over the count is therefore a mean of batch losses that
        depends on the batch size, not a mean over slices."""
        arrays = {"image": self.network_input(images), "label": np.asarray(labels, np.int32)}
        function = self._jitted(eval_step, **loss_weights)
        pieces, sums, count = [], {}, 0
        for (predicted, parts), valid in self._run(function, variables, arrays, class_weights):
            for name, value in jax.device_get(parts).items():
                sums[name] = sums.get(name, 0.0) + float(value) * valid
            count += valid
            pieces.append(gather_to_host(predicted)[:valid])
        return np.concatenate(pieces), sums, count
