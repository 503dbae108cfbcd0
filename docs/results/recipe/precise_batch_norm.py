"""Held-out Dice with a checkpoint's running BatchNorm statistics against statistics recomputed
over its fold's training slices, unaugmented, in batches of 10 ("precise BatchNorm"): the mean
of the batches' means and variances. Each run's best and latest checkpoints; its test patients
and its validation patient; mean Dice over organs, largest component kept.

    python docs/results/recipe/precise_batch_norm.py OUT.json RUN [RUN ...]
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from scse_jax import evaluate, sharding
from scse_jax.data.run_data import prepare_split
from scse_jax.inference import Segmenter
from scse_jax.models.unet import BATCH_NORM_MOMENTUM


def precise_statistics(segmenter, train_cases, batch_size=10, seed=0):
    """A train-mode call from zero statistics returns (1 - momentum) x the batch's own."""
    model = segmenter.predictor.model
    images = np.concatenate([case.images for case in train_cases])[..., None].astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    variables = jax.device_get(segmenter.variables)
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])

    @jax.jit
    def batch_statistics(x):
        _, updates = model.apply(
            {"params": variables["params"], "batch_stats": zeros}, x, train=True, mutable=["batch_stats"]
        )
        return updates["batch_stats"]

    batches = [order[start : start + batch_size] for start in range(0, len(order) - batch_size + 1, batch_size)]
    total = None
    for rows in batches:
        statistics = batch_statistics(images[rows])
        total = statistics if total is None else jax.tree.map(jnp.add, total, statistics)
    return jax.tree.map(lambda t: t / (len(batches) * (1 - BATCH_NORM_MOMENTUM)), total)


def mean_dice(segmenter, cases):
    return {case.patient: evaluate.mean_dice(segmenter.segment_case(case), case, segmenter.class_names) for case in cases}


def main(out, runs):
    result = {}
    for run in runs:
        for which in ("best", "latest"):
            segmenter = Segmenter.from_checkpoint(run, which=which)
            config = evaluate.config_on_this_machine(segmenter.config)
            held_out = prepare_split(config, "test") + prepare_split(config, "val")
            running = mean_dice(segmenter, held_out)
            variables = dict(
                jax.device_get(segmenter.variables),
                batch_stats=precise_statistics(segmenter, prepare_split(config, "train")),
            )
            segmenter.variables = jax.device_put(variables, sharding.replicated_sharding(segmenter.predictor.mesh))
            result[f"{run}:{which}:{segmenter.step}"] = {"running": running, "precise": mean_dice(segmenter, held_out)}
            json.dump(result, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
