"""Patient-wise splits, class weights, shuffled host batches, augmentation and prefetching.

Everything here is host-side numpy; `scse_jax.sharding` moves batches onto the devices.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from scipy import ndimage

from scse_jax.data import intensity
from scse_jax.data.preprocess import PreparedCase, label_shares
from scse_jax.data.types import patient_order
from scse_jax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]
Augment = Callable[[Batch, np.random.Generator], Batch]


@dataclasses.dataclass(frozen=True)
class Split:
    """Patient ids of each set, sorted; no patient is in two sets."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def split_patients(
    patients: Iterable[str], *, num_folds: int = 5, fold: int = 0, num_val: int = 1, seed: int = 0
) -> Split:
    """Splits patients into train/val/test sets for one cross-validation fold.

    The patients are sorted, shuffled from `seed` and cut into `num_folds` folds of nearly
    equal size. Test is fold `fold`; val is the first `num_val` patients of the following folds
    (in fold order, wrapping around); train is everyone else. With `num_folds=1` there is no
    test set. The result depends only on the set of patients and the arguments.
    """
    patients = [str(p) for p in patients]
    counts = collections.Counter(patients)
    duplicates = sorted((p for p, n in counts.items() if n > 1), key=patient_order)
    if duplicates:
        raise ConfigError(f"patient ids must be unique; repeated: {duplicates}")
    if num_folds < 1:
        raise ConfigError(f"num_folds must be >= 1, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise ConfigError(f"fold must be in [0, {num_folds}), got {fold}")
    if num_val < 0:
        raise ConfigError(f"num_val must be >= 0, got {num_val}")
    if len(patients) < num_folds:
        raise ConfigError(f"{len(patients)} patients cannot fill {num_folds} folds")
    ordered = sorted(patients, key=patient_order)
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    folds = [list(f) for f in np.array_split(np.array(shuffled, dtype=object), num_folds)]
    if num_folds == 1:
        test, rest = [], shuffled
    else:
        test = folds[fold]
        rest = [p for offset in range(1, num_folds) for p in folds[(fold + offset) % num_folds]]
    if len(rest) < num_val + 1:
        raise ConfigError(
            f"{len(patients)} patients leave {len(rest)} outside the test fold: too few for "
            f"num_val={num_val} plus at least one training patient"
        )

    def ordered_tuple(ids):
        return tuple(sorted(ids, key=patient_order))

    return Split(
        train=ordered_tuple(rest[num_val:]), val=ordered_tuple(rest[:num_val]), test=ordered_tuple(test)
    )


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels of each class in a label array, (num_classes,) int64."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"label values must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    return np.bincount(labels.ravel().astype(np.int64), minlength=num_classes)


# How the cross entropy weighs each class's pixels (train.class_weighting).
CLASS_WEIGHTINGS = ("inverse_frequency", "median_frequency", "none")


def weights_from_counts(counts: np.ndarray, method: str) -> np.ndarray:
    """Class weights, (num_classes,) float32, from per-class pixel counts.

    inverse_frequency (the report's): proportional to 1 / frequency, summing to num_classes.
    median_frequency (QuickNAT's class term, Roy et al., NeuroImage 2019):
      median(f) / f_l, f the frequencies of the classes present.
    none: 1 for every class present.
    A class absent from the counts gets weight 0 (it has no pixels to weigh).
    """
    if method not in CLASS_WEIGHTINGS:
        raise ConfigError(f"class weighting must be one of {CLASS_WEIGHTINGS}, got {method!r}")
    counts = np.asarray(counts, np.int64)
    if counts.sum() == 0:
        raise DataError("no labelled pixels to compute class weights from")
    present = counts > 0
    weights = np.zeros(len(counts), np.float64)
    if method == "none":
        weights[present] = 1.0
    elif method == "median_frequency":
        frequencies = counts[present] / counts.sum()
        weights[present] = np.median(frequencies) / frequencies
    else:
        weights[present] = counts.sum() / counts[present]
        weights *= len(counts) / weights.sum()
    return weights.astype(np.float32)


def input_channels(data_config) -> int:
    """Network input channels: each slice with `data.context_slices` neighbours on either side."""
    return 2 * int(data_config.get("context_slices", 0)) + 1


def with_context(images: np.ndarray, context: int) -> np.ndarray:
    """(N, S, S) consecutive slices of one volume -> (N, S, S, 2 context + 1) float32.

    Channel j of slice i is slice i + j - context, repeated at the volume's ends (2.5-D input).
    """
    if images.ndim != 3:
        raise DataError(f"expected (slices, rows, cols) of one volume, got {images.shape}")
    if context < 0:
        raise ConfigError(f"context_slices must be >= 0, got {context}")
    count = len(images)
    neighbours = np.clip(np.arange(count)[:, None] + np.arange(-context, context + 1)[None, :], 0, count - 1)
    return np.moveaxis(np.asarray(images, np.float32)[neighbours], 1, -1)


@dataclasses.dataclass
class SliceDataset:
    """2-D training examples: every slice of every case.

    Attributes:
      images: (N, S, S, C) float32: C = 1, or each slice with its neighbours (`with_context`).
      labels: (N, S, S) int32 class ids.
      label_shares: (N, S, S, K) float32, each of K classes' share of every pixel
        (`preprocess.label_shares`), or None: trained on with ``data.soft_labels``.
    """

    images: np.ndarray
    labels: np.ndarray
    label_shares: np.ndarray | None = None

    def __post_init__(self):
        shapes_match = self.images.ndim == 4 and self.labels.shape == self.images.shape[:3]
        if not shapes_match or self.images.shape[-1] % 2 != 1:
            raise DataError(
                f"images (N, S, S, C), C odd, and labels (N, S, S) must match; got {self.images.shape} "
                f"and {self.labels.shape}"
            )
        if self.label_shares is not None and (
            self.label_shares.ndim != 4 or self.label_shares.shape[:3] != self.labels.shape
        ):
            raise DataError(f"label shares {self.label_shares.shape} do not match labels {self.labels.shape}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def from_cases(
        cls, prepared_cases: Sequence[PreparedCase], *, context: int = 0, share_classes: int = 0
    ) -> "SliceDataset":
        """Stacks the slices of labelled prepared cases (all on the same grid), each with
        `context` neighbours on either side as channels, and with `share_classes` > 0 the
        shares of that many classes in every pixel."""
        if not prepared_cases:
            raise DataError("no prepared cases to build a dataset from")
        unlabelled = [c.case_key for c in prepared_cases if c.labels is None]
        if unlabelled:
            raise DataError(f"cases without ground truth cannot be trained on: {unlabelled}")
        shapes = {c.images.shape[1:] for c in prepared_cases}
        if len(shapes) != 1:
            raise DataError(f"prepared cases lie on different grids: {sorted(shapes)}")
        images = np.concatenate([with_context(c.images, context) for c in prepared_cases])
        labels = np.concatenate([c.labels for c in prepared_cases]).astype(np.int32)
        shares = None
        if share_classes:
            shares = np.concatenate([_shares_on_grid(c, share_classes) for c in prepared_cases])
        return cls(images=images, labels=labels, label_shares=shares)

    def wait_for_rows(self, stop: int) -> None:
        """Returns once rows [0, stop) hold their data: at once, for a dataset built whole."""


class StreamedSliceDataset(SliceDataset):
    """A SliceDataset whose rows another thread fills case by case, in order.

    Reads go through `wait_for_rows`, so training can start on the first cases while later
    ones are still being decoded. A producer that fails hands its error to every waiting reader.
    """

    def __init__(self, num_rows: int, size: int, *, context: int = 0, share_classes: int = 0):
        super().__init__(
            np.zeros((num_rows, size, size, 2 * context + 1), np.float32),
            np.zeros((num_rows, size, size), np.int32),
            np.zeros((num_rows, size, size, share_classes), np.float32) if share_classes else None,
        )
        self.context = context
        self.rows_filled = 0
        self._error: BaseException | None = None
        self._changed = threading.Condition()

    def append_case(self, prepared: PreparedCase) -> None:
        """Copies the next case's slices into the following rows."""
        start, count = self.rows_filled, len(prepared.images)
        if prepared.labels is None:
            raise DataError(f"cases without ground truth cannot be trained on: {prepared.case_key}")
        if start + count > len(self) or prepared.images.shape[1:] != self.images.shape[1:3]:
            raise DataError(
                f"{prepared.case_key}: {prepared.images.shape} does not fit rows {start}..{start + count} of "
                f"{self.images.shape[:3]}: did the data change during the run?"
            )
        self.images[start : start + count] = with_context(prepared.images, self.context)
        self.labels[start : start + count] = prepared.labels
        if self.label_shares is not None:
            self.label_shares[start : start + count] = _shares_on_grid(prepared, self.label_shares.shape[-1])
        with self._changed:
            self.rows_filled = start + count
            self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._changed:
            self._error = error
            self._changed.notify_all()

    def wait_for_rows(self, stop: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self.rows_filled >= stop or self._error is not None)
            if self.rows_filled < stop:
                raise DataError(f"the training data could not be prepared: {self._error}") from self._error


def _shares_on_grid(prepared: PreparedCase, num_classes: int) -> np.ndarray:
    return label_shares(prepared.native_labels, prepared.images.shape[1:], num_classes)


def streaming_order(case_lengths: Sequence[int], *, buffer_size: int, seed: int) -> np.ndarray:
    """An epoch order that can start before all cases are read.

    Rows are numbered case by case, in the order the cases are read; a shuffle buffer of
    `buffer_size` rows draws position i from rows below i + buffer_size, so the first batches
    need only the first cases. Each row appears once; the order depends only on the arguments.
    """
    total = int(sum(case_lengths))
    if buffer_size < 1:
        raise ConfigError(f"buffer_size must be positive, got {buffer_size}")
    rng = np.random.default_rng(seed)
    buffer = list(range(min(buffer_size, total)))
    next_row = len(buffer)
    order = np.empty(total, np.int64)
    for position in range(total):
        pick = int(rng.integers(len(buffer)))
        order[position] = buffer[pick]
        if next_row < total:
            buffer[pick] = next_row
            next_row += 1
        else:
            buffer[pick] = buffer[-1]
            buffer.pop()
    return order


def steps_per_epoch(num_examples: int, batch_size: int, fixed: int = 0) -> int:
    """Batches per epoch: ``fixed`` where it is positive, else the full batches of one pass (the
    remainder dropped); an error when the examples do not fill one batch."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if num_examples < batch_size:
        raise ConfigError(f"batch_size {batch_size} exceeds the {num_examples} training examples")
    return fixed if fixed > 0 else num_examples // batch_size


def epoch_order(
    num_examples: int, num_rows: int, *, seed: int, epoch: int, first: np.ndarray | None = None
) -> np.ndarray:
    """The rows of one epoch's batches, ``num_rows`` of them: ``first`` (by default the epoch's
    shuffle of every row), then further shuffles, cut to ``num_rows``. An epoch shorter than a
    pass sees a different part of the data each epoch, a longer one every row more than once.
    """
    rng = np.random.default_rng((seed, epoch))
    parts = [rng.permutation(num_examples) if first is None else np.asarray(first)]
    while sum(len(part) for part in parts) < num_rows:
        parts.append(rng.permutation(num_examples))
    return np.concatenate(parts)[:num_rows]


def iterate_batches(
    dataset: SliceDataset,
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
    augment: Augment | None = None,
    process_index: int = 0,
    process_count: int = 1,
    first_step: int = 0,
    order: np.ndarray | None = None,
    num_steps: int | None = None,
) -> Iterator[Batch]:
    """Yields one epoch of this process's part of each global batch.

    The order is np.random.default_rng((seed, epoch)).permutation, so every epoch reshuffles
    and every run repeats. Process `process_index` gets rows
    [i * B / process_count, (i + 1) * B / process_count) of each global batch of size B.
    `augment(batch, rngs)` gets one generator per example, seeded from (seed, epoch, its row in
    the dataset), so the augmented global batch is the same however it is split over processes.
    With drop_remainder=False the last, smaller batch is yielded too (single process only).
    `first_step` skips the epoch's first steps without building them (resuming mid-epoch);
    the batches after it are the same as in an uninterrupted epoch. `order`, a permutation of
    the rows, replaces the shuffle (see `streaming_order`); each batch waits for its rows.
    `num_steps` fixes the epoch's length in batches (`epoch_order`: more shuffles follow the
    first where one pass is not enough; a row's second pass in an epoch gets other random draws).

    Yields:
      {"image": (B_local, S, S, C) float32, "label": (B_local, S, S) int32}, and
      "label_shares": (B_local, S, S, K) float32 where the dataset has them.
    """
    if batch_size < 1 or batch_size % process_count:
        raise ConfigError(
            f"batch_size {batch_size} must be a positive multiple of process_count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
    num_examples = len(dataset)
    fixed_length = num_steps is not None
    if fixed_length:
        if num_steps < 1 or not drop_remainder or not shuffle:
            raise ConfigError(f"num_steps must be positive, with shuffled full batches; got {num_steps}")
        num_steps = steps_per_epoch(num_examples, batch_size, num_steps)
    elif drop_remainder:
        num_steps = steps_per_epoch(num_examples, batch_size)
    elif process_count > 1:
        raise ConfigError("drop_remainder=False is only supported with a single process")
    else:
        num_steps = math.ceil(num_examples / batch_size)
    if order is not None:
        order = np.asarray(order)
        if order.shape != (num_examples,):
            raise ConfigError(f"order must hold each of the {num_examples} rows once, got shape {order.shape}")
    if shuffle:
        num_rows = num_steps * batch_size if fixed_length else num_examples
        order = epoch_order(num_examples, num_rows, seed=seed, epoch=epoch, first=order)
    elif order is None:
        order = np.arange(num_examples)
    local_size = batch_size // process_count
    if first_step < 0:
        raise ConfigError(f"first_step must be >= 0, got {first_step}")
    for step in range(first_step, num_steps):
        global_rows = order[step * batch_size : (step + 1) * batch_size]
        rows = global_rows[process_index * local_size : (process_index + 1) * local_size]
        dataset.wait_for_rows(int(rows.max()) + 1)
        batch = {"image": dataset.images[rows], "label": dataset.labels[rows]}
        if dataset.label_shares is not None:
            batch["label_shares"] = dataset.label_shares[rows]
        if augment is not None:
            passes = (step * batch_size + process_index * local_size + np.arange(len(rows))) // num_examples
            batch = augment(batch, [
                np.random.default_rng((seed, epoch, int(row)) + ((int(again),) if again else ()))
                for row, again in zip(rows, passes)
            ])
        yield batch


@dataclasses.dataclass(frozen=True)
class SpatialRange:
    """The similarity transforms one spatial augmentation set draws from, per example."""

    max_rotation_deg: float
    scale_range: tuple[float, float]
    max_shift_fraction: float  # of the side, each axis
    log_uniform_scale: bool  # zooming in and out about equally likely


# Proper similarities only: an abdomen never appears mirrored, so no flips at all. "wide" takes
# nnU-Net's scale range (nnUNetTrainerV2.setup_DA_params: 0.7-1.4) and its earlier 3-D rotation
# bound (15 degrees); its 2-D rotations (up to 180 degrees) are not anatomical here.
SPATIAL_AUGMENTATIONS = {
    "small": SpatialRange(10.0, (0.9, 1.1), 0.06, log_uniform_scale=False),
    "wide": SpatialRange(15.0, (0.7, 1.4), 0.10, log_uniform_scale=True),
}


@functools.cache
def _warp_pool() -> concurrent.futures.ThreadPoolExecutor:
    workers = min(8, os.cpu_count() or 1)
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="augment")


def augment_batch(
    batch: Batch,
    rng: np.random.Generator | Sequence[np.random.Generator],
    *,
    modality: str,
    intensity_set: str = "jitter",
    organ_signal_loss: float = 0.0,
    spatial_set: str = "small",
) -> Batch:
    """Random rotation, isotropic scale and shift per example, then intensity augmentation.

    The same geometric transform moves image (bilinear), labels (nearest) and label shares
    where the batch has them (bilinear, so they still sum to 1); each is a proper similarity
    (positive scale, small rotation), so left stays left and the kidneys keep their sides;
    ``spatial_set`` names its ranges in `SPATIAL_AUGMENTATIONS`. ``intensity_set`` is one of
    `intensity.INTENSITY_AUGMENTATIONS` ("jitter": contrast and brightness jitter; "nnunet":
    nnU-Net's intensity transforms; "gin": the jitter, then random-network intensity transforms
    on half of the examples),
    drawn per example; before it, a share ``organ_signal_loss`` of the examples get a dark
    liver, spleen or both (`intensity.organ_signal_loss`). `rng` is one generator for the batch, or one per example (see
    `iterate_batches`).
    """
    if modality not in intensity.JITTER_BRIGHTNESS:
        raise ConfigError(f"modality must be one of {tuple(intensity.JITTER_BRIGHTNESS)}, got {modality!r}")
    if intensity_set not in intensity.INTENSITY_AUGMENTATIONS:
        raise ConfigError(
            f"intensity augmentation must be one of {intensity.INTENSITY_AUGMENTATIONS}, got {intensity_set!r}"
        )
    if spatial_set not in SPATIAL_AUGMENTATIONS:
        raise ConfigError(
            f"spatial augmentation must be one of {tuple(SPATIAL_AUGMENTATIONS)}, got {spatial_set!r}"
        )
    spatial = SPATIAL_AUGMENTATIONS[spatial_set]
    images, labels = batch["image"], batch["label"]
    count, rows, cols = labels.shape
    per_example = not isinstance(rng, np.random.Generator)

    def uniform(low, high, shape=()):
        if per_example:
            return np.stack([generator.uniform(low, high, shape) for generator in rng])
        return rng.uniform(low, high, (count,) + shape)

    angle = np.deg2rad(uniform(-spatial.max_rotation_deg, spatial.max_rotation_deg))
    if spatial.log_uniform_scale:
        scale = np.exp(uniform(*np.log(spatial.scale_range)))
    else:
        scale = uniform(*spatial.scale_range)
    shift = uniform(-spatial.max_shift_fraction, spatial.max_shift_fraction, (2,)) * (rows, cols)

    # Output pixel p samples the input at A p + offset, A = R(angle) / scale, about the centre.
    centre = np.array([(rows - 1) / 2, (cols - 1) / 2])
    moved_images = np.empty(images.shape, np.float32)
    moved_labels = np.empty_like(labels)
    shares = batch.get("label_shares")
    moved_shares = None if shares is None else np.empty(shares.shape, np.float32)

    def warp(example: int) -> None:
        cos, sin = np.cos(angle[example]) / scale[example], np.sin(angle[example]) / scale[example]
        matrix = np.array([[cos, -sin], [sin, cos]])
        offset = centre - matrix @ centre - shift[example]
        for channel in range(images.shape[-1]):  # bilinear images, nearest labels, one transform
            ndimage.affine_transform(
                images[example, ..., channel], matrix, offset, order=1, mode="nearest",
                output=moved_images[example, ..., channel],
            )
        ndimage.affine_transform(labels[example], matrix, offset, order=0, mode="nearest", output=moved_labels[example])
        for class_id in range(0 if shares is None else shares.shape[-1]):
            ndimage.affine_transform(
                shares[example, ..., class_id], matrix, offset, order=1, mode="nearest",
                output=moved_shares[example, ..., class_id],
            )

    # scipy.ndimage releases the GIL, so examples warp in parallel; each writes only its own rows.
    list(_warp_pool().map(warp, range(count)))
    generators = rng if per_example else [rng] * count
    if organ_signal_loss > 0:
        for i in range(count):
            if generators[i].uniform() < organ_signal_loss:
                moved_images[i] = intensity.organ_signal_loss(moved_images[i], moved_labels[i], generators[i])
    if intensity_set in ("jitter", "gin"):
        contrast = uniform(*intensity.JITTER_CONTRAST, (1, 1, 1))
        brightness = uniform(-intensity.JITTER_BRIGHTNESS[modality], intensity.JITTER_BRIGHTNESS[modality], (1, 1, 1))
        moved_images = moved_images * contrast + brightness
    if intensity_set == "gin":
        for i in range(count):
            if generators[i].uniform() < intensity.GIN_PROBABILITY:
                moved_images[i] = intensity.gin(moved_images[i], generators[i])
    if intensity_set == "nnunet":
        moved_images = np.stack([intensity.nnunet(moved_images[i], generators[i]) for i in range(count)])
    moved = dict(batch, image=moved_images.astype(np.float32), label=moved_labels)
    if moved_shares is not None:
        moved["label_shares"] = moved_shares
    return moved


_END = object()


@dataclasses.dataclass
class _ProducerError:
    error: BaseException


def prefetch(iterator: Iterable, size: int = 2) -> Iterator:
    """Runs `iterator` in a background thread, keeping up to `size` items ready.

    An exception in the producer is raised in the consumer at the item where it happened.
    Closing the returned generator (or dropping it) stops the producer thread.
    """
    if size < 1:
        raise ConfigError(f"prefetch size must be positive, got {size}")
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as error:  # handed to the consumer, which re-raises it
            put(_ProducerError(error))
            return
        put(_END)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _ProducerError):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5.0)
