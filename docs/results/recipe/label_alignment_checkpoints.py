"""Held-out Dice of networks trained on labels half a native pixel off their images (the code
before `preprocess.resize_labels`), per way of bringing their 128 px predictions to the 256 px
grid: the seed-0 runs of the study (best checkpoint, each fold's test patients, largest
component kept).

    python docs/results/recipe/label_alignment_checkpoints.py STUDY_DIR OUT.json

- nearest: class ids resized by nearest neighbour (the code before the fix);
- bilinear: class probabilities resized bilinearly (`postprocess.to_native` now);
- bilinear_aligned: the same, sampled half a native pixel earlier, where these networks learned
  the labels to lie; it estimates what training on aligned labels gains.
"""

import json
import sys
from pathlib import Path

import numpy as np

from scse_jax import evaluate, postprocess
from scse_jax.data.run_data import prepare_split
from scse_jax.inference import Segmenter


def _linear(array, axis, n_out, offset):
    n_in = array.shape[axis]
    positions = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5 - offset, 0, n_in - 1)
    lower = np.floor(positions).astype(int)
    upper = np.minimum(lower + 1, n_in - 1)
    weight = (positions - lower).reshape([-1 if i == axis else 1 for i in range(array.ndim)])
    return np.take(array, lower, axis=axis) * (1 - weight) + np.take(array, upper, axis=axis) * weight


def native_ids(probabilities, rows_cols, way):
    if way == "nearest":
        index = lambda n_in, n_out: np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(int), n_in - 1)
        ids = probabilities.argmax(-1)
        return ids[:, index(ids.shape[1], rows_cols[0])][:, :, index(ids.shape[2], rows_cols[1])].astype(np.uint8)
    offset = 0.25 if way == "bilinear_aligned" else 0.0  # in grid pixels: half a native pixel at 128 -> 256
    return _linear(_linear(probabilities, 1, rows_cols[0], offset), 2, rows_cols[1], offset).argmax(-1).astype(np.uint8)


def main(study, out):
    ways = ("nearest", "bilinear", "bilinear_aligned")
    result = {}
    for model in ("mr_unet_cpu", "mr_scse_cpu"):
        for fold in range(5):
            run = Path(study) / model / "seed0" / f"fold{fold}"
            segmenter = Segmenter.from_checkpoint(run, which="best")
            for case in prepare_split(evaluate.config_on_this_machine(segmenter.config), "test"):
                probabilities = segmenter.segment(case.images, probabilities=True)
                row = {}
                for way in ways:
                    labels = postprocess.keep_largest_components(native_ids(probabilities, case.native_shape[1:], way), range(1, 5))
                    row[way] = evaluate.mean_dice(labels, case, segmenter.class_names)
                result[f"{model}/fold{fold}/{case.patient}"] = row
                print(model, fold, case.patient, row, flush=True)
    summary = {}
    for model in ("mr_unet_cpu", "mr_scse_cpu"):
        rows = [row for key, row in result.items() if key.startswith(model + "/")]
        summary[model] = {way: round(float(np.mean([r[way] for r in rows])), 4) for way in ways}
        summary[model]["patients_better_aligned_than_nearest"] = sum(r["bilinear_aligned"] > r["nearest"] for r in rows)
        summary[model]["patients"] = len(rows)
    json.dump({"summary": summary, "per_patient": result}, open(out, "w"), indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
