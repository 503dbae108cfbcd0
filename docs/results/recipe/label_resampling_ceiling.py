"""How well label maps survive the trip to the 128 px training grid and back to 256 px, per way
of resizing, with no network involved: mean Dice per organ over the 15 T2-SPIR patients, and
each organ's area on the training grid (x 4) over its native area.

    python docs/results/recipe/label_resampling_ceiling.py ../shared/data/chaos_mr_t2 \
        docs/results/recipe/label_resampling_ceiling.json

- nearest_nearest: labels down and predictions up by nearest neighbour (the code before the fix;
  halving takes input pixel 2j + 1, half a native pixel off the bilinearly resized image);
- share_probabilities: labels down by the largest class share, ties on a checkerboard
  (`preprocess.resize_labels`), the resulting hard labels brought back as bilinearly resized
  one-hot probabilities (the fix);
- share_ties_to_organ_probabilities: the same with every tie given to the organ (the fix's first
  version, bf918dc);
- soft_probabilities: the class shares themselves, resized back bilinearly (what a network
  predicting each pixel's class fractions exactly would reach).
"""

import glob
import json
import sys

import nibabel
import numpy as np

from scse_jax.data.preprocess import resize_labels, resize_probabilities, resize_slices


def dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def nearest(labels, size):
    index = lambda n_in: np.minimum(np.floor((np.arange(size) + 0.5) * n_in / size).astype(int), n_in - 1)
    return labels[:, index(labels.shape[1])][:, :, index(labels.shape[2])]


def main(root, out):
    scores, areas = {}, {}
    for path in sorted(glob.glob(f"{root}/label_*.nii.gz")):
        labels = np.asarray(nibabel.load(path).dataobj).astype(np.uint8).transpose(2, 0, 1)
        shares = np.stack([resize_slices((labels == c).astype(np.float32), 128) for c in range(5)], -1)
        ties_to_organ = (shares + 1e-4 * np.arange(5)).argmax(-1)  # float32 shares tie exactly at 0.5
        grids = {
            "nearest_nearest": nearest(labels, 128),
            "share_probabilities": resize_labels(labels, (128, 128)),
            "share_ties_to_organ_probabilities": ties_to_organ,
        }
        backs = {
            "nearest_nearest": nearest(grids["nearest_nearest"], 256),
            "share_probabilities": resize_probabilities(np.eye(5, dtype=np.float32)[grids["share_probabilities"]], (256, 256)).argmax(-1),
            "share_ties_to_organ_probabilities": resize_probabilities(np.eye(5, dtype=np.float32)[ties_to_organ], (256, 256)).argmax(-1),
            "soft_probabilities": resize_probabilities(shares, (256, 256)).argmax(-1),
        }
        for way, back in backs.items():
            scores.setdefault(way, []).append([dice(back == c, labels == c) for c in range(1, 5)])
            if way in grids:
                areas.setdefault(way, []).append([4 * (grids[way] == c).sum() / (labels == c).sum() for c in range(1, 5)])
    result = {
        way: {"dice_per_organ": np.mean(v, 0).round(4).tolist(), "dice_mean": round(float(np.mean(v)), 4), "patients": len(v)}
        for way, v in scores.items()
    }
    for way, v in areas.items():
        result[way]["grid_area_over_native_per_organ"] = np.mean(v, 0).round(4).tolist()
    json.dump(result, open(out, "w"), indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
