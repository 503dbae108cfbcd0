"""The report's loss: class-weighted cross entropy plus soft Dice.

Both compare the prediction with a target distribution per pixel: the one-hot of its label, or
with ``data.soft_labels`` each class's share of the pixel (`preprocess.label_shares`).

Cross entropy is weighted per pixel by its target's class weight (plus, optionally, a boundary
weight: QuickNAT's w0 I(|grad S(x)| > 0), Roy et al., NeuroImage 2019) before reducing, and
normalised by the sum of those weights (as PyTorch's weighted ``CrossEntropyLoss`` does), so
the loss scale does not depend on how rare the foreground is in a batch.

Soft Dice is computed per foreground class over the whole global batch and averaged over
classes. Empty-class policy: a class absent from the batch's ground truth contributes
``smooth / (sum of its predicted probability + smooth)``, close to 1 (no loss) when the
network predicts nothing of it and falling as it predicts false positives; so absent
organs are neither ignored nor a source of huge gradients.

With deep supervision (`deep_supervision_loss`), coarser outputs of the decoder are scored
the same way against targets pooled to their resolution.
"""

import functools

import jax
import jax.numpy as jnp

DICE_SMOOTH = 1.0


def _example_weights(labels: jax.Array, example_mask: jax.Array | None) -> jax.Array:
    """Per-pixel 1/0 weights from a per-example mask (padding rows of a batch get 0)."""
    if example_mask is None:
        return jnp.ones(labels.shape, jnp.float32)
    return jnp.broadcast_to(example_mask.reshape((-1,) + (1,) * (labels.ndim - 1)), labels.shape)


def label_boundaries(labels: jax.Array) -> jax.Array:
    """1.0 where a pixel's label differs from one of its 4 in-plane neighbours, else 0.0.

    labels: (B, H, W) class ids; the image edge counts as the pixel's own label.
    """
    padded = jnp.pad(labels, ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows, cols = labels.shape[1:]
    neighbours = (
        padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]
    )
    differs = functools.reduce(jnp.logical_or, [n != labels for n in neighbours])
    return differs.astype(jnp.float32)


def _targets(labels: jax.Array, num_classes: int, shares: jax.Array | None) -> jax.Array:
    """Each pixel's target distribution over the classes: ``shares`` (B, H, W, C) where given,
    else the one-hot of ``labels`` (B, H, W)."""
    if shares is None:
        return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return shares.astype(jnp.float32)


def weighted_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    example_mask: jax.Array | None = None,
    *,
    boundary_weight: float = 0.0,
    shares: jax.Array | None = None,
) -> jax.Array:
    """Sum of -w(x) sum_c q_c(x) log p_c(x) over pixels x, divided by the sum of w(x).

    q(x) is the one-hot of the label y(x), or the class ``shares`` of the pixel where given
    (``data.soft_labels``). w(x) = sum_c q_c(x) class_weights[c] + boundary_weight *
    max(class_weights) at label boundaries: with median-frequency class weights and
    boundary_weight 2 this is QuickNAT's w0 = 2 median(f) / f_min.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = _targets(labels, logits.shape[-1], shares)
    pixel_weights = jnp.sum(targets * class_weights, axis=-1)  # elementwise: no reduced-precision matmul on GPUs
    if boundary_weight:
        pixel_weights = pixel_weights + boundary_weight * jnp.max(class_weights) * label_boundaries(labels)
    pixel_weights = pixel_weights * _example_weights(labels, example_mask)
    pixel_losses = -jnp.sum(targets * log_probs, axis=-1)
    return jnp.sum(pixel_weights * pixel_losses) / jnp.maximum(jnp.sum(pixel_weights), 1e-12)


def soft_dice_loss(
    logits: jax.Array, labels: jax.Array, example_mask: jax.Array | None = None, *, shares: jax.Array | None = None
) -> jax.Array:
    """1 - mean over foreground classes of the soft Dice over the whole batch (against the one-hot
    labels, or the class ``shares`` where given)."""
    mask = _example_weights(labels, example_mask)[..., None]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * mask
    targets = _targets(labels, logits.shape[-1], shares) * mask
    reduce_axes = tuple(range(logits.ndim - 1))
    intersection = jnp.sum(probs * targets, axis=reduce_axes)
    total = jnp.sum(probs, axis=reduce_axes) + jnp.sum(targets, axis=reduce_axes)
    dice = (2.0 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)
    return 1.0 - jnp.mean(dice[1:])


def segmentation_loss(
    logits: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    boundary_weight: float = 0.0,
    example_mask: jax.Array | None = None,
    shares: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted cross entropy plus soft Dice, against the labels or their class ``shares``;
    returns the total and its parts."""
    ce = weighted_cross_entropy(
        logits, labels, class_weights, example_mask, boundary_weight=boundary_weight, shares=shares
    )
    dice = soft_dice_loss(logits, labels, example_mask, shares=shares)
    total = ce_weight * ce + dice_weight * dice
    return total, {"loss": total, "cross_entropy": ce, "dice_loss": dice}


def pooled_targets(
    labels: jax.Array, num_classes: int, factor: int, shares: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(class ids, class shares) on a grid ``factor`` times coarser: each class's share of every
    factor x factor block of the one-hot labels (or of their ``shares``), and the class with the
    largest share (ties to the lower class id)."""
    targets = _targets(labels, num_classes, shares)
    batch, rows, cols, _ = targets.shape
    if rows % factor or cols % factor:
        raise ValueError(f"a {rows}x{cols} label map does not pool by {factor}")
    pooled = targets.reshape(batch, rows // factor, factor, cols // factor, factor, num_classes).mean(axis=(2, 4))
    return jnp.argmax(pooled, axis=-1).astype(labels.dtype), pooled


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's weights of outputs ordered finest first: 1 / 2**i, normalised to sum to 1
    (Isensee et al., Nature Methods 2021; nnUNetTrainer._build_loss)."""
    raw = [0.5**i for i in range(num_outputs)]
    return [w / sum(raw) for w in raw]


def deep_supervision_loss(
    logits_by_scale: list[jax.Array],
    labels: jax.Array,
    class_weights: jax.Array,
    *,
    shares: jax.Array | None = None,
    **loss_weights: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`segmentation_loss` of each output, finest (the network's logits) first, against the
    targets pooled to its grid, summed with `deep_supervision_weights`.

    A coarse output's boundary weight (``boundary_weight``) marks the outlines of its pooled
    class ids, so an outline of the full-size grid can fall inside one of its blocks.

    Returns the weighted sum and the finest output's parts (so that its logged loss stays
    comparable with validation's), with the weighted sum as "deep_supervision_loss"; one
    output is `segmentation_loss` itself.
    """
    if len(logits_by_scale) == 1:
        return segmentation_loss(logits_by_scale[0], labels, class_weights, shares=shares, **loss_weights)
    total, parts = 0.0, {}
    for logits, weight in zip(logits_by_scale, deep_supervision_weights(len(logits_by_scale))):
        factor = labels.shape[1] // logits.shape[1]
        level_labels, level_shares = labels, shares
        if factor > 1:
            level_labels, level_shares = pooled_targets(labels, logits.shape[-1], factor, shares)
        loss, level_parts = segmentation_loss(
            logits, level_labels, class_weights, shares=level_shares, **loss_weights
        )
        parts = parts or level_parts
        total = total + weight * loss
    return total, {**parts, "deep_supervision_loss": total}
