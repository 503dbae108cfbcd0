"""A recipe experiment's table: mean Dice over organs (largest component kept) of each test
patient of folds 0 and 2, seed 0, before and after one change.

    python docs/results/recipe/paired_table.py schedule28    # 24 epochs halved every 6 -> 28 halved every 7
    python docs/results/recipe/paired_table.py soft_labels   # picked classes -> class shares

"Before" is a study's run (its `test_scores.csv`, the largest-component rows); "after" is the
experiment's `evaluate --checkpoint` CSV in this folder, which keeps the largest component as
the recipe's config says.
"""

import csv
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent

# name: (column titles, the study whose runs are "before", the "after" CSVs' prefix)
EXPERIMENTS = {
    "schedule28": (
        ("24 epochs, halved every 6", "28 epochs, halved every 7"), "mr_t2_cpu_study_gin24_runs", "schedule28"
    ),
    "soft_labels": (("picked classes", "class shares"), "mr_t2_cpu_study_runs", "soft_labels"),
}


def patient_means(path, postprocess=None):
    dice = {}
    for row in csv.DictReader(open(path)):
        if postprocess is None or row["postprocess"] == postprocess:
            dice.setdefault(row["patient"], []).append(float(row["dice"]))
    return {patient: statistics.mean(values) for patient, values in dice.items()}


def main(name):
    (title_before, title_after), study, prefix = EXPERIMENTS[name]
    print(f"| model | fold | patient | {title_before} | {title_after} |")
    print("| --- | --- | --- | --- | --- |")
    before, after = [], []
    for model in ("unet", "scse"):
        for fold in (0, 2):
            old = patient_means(
                HERE.parent / f"{study}/mr_{model}_cpu/seed0/fold{fold}/test_scores.csv", "largest_component"
            )
            new = patient_means(HERE / f"{prefix}_{model}_fold{fold}_test.csv")
            for patient in sorted(new, key=int):
                print(f"| {model} | {fold} | {patient} | {old[patient]:.3f} | {new[patient]:.3f} |")
                before.append(old[patient])
                after.append(new[patient])
    better = sum(a > b for a, b in zip(after, before))
    print(
        f"| mean of {len(after)} | | | {statistics.mean(before):.3f} | "
        f"{statistics.mean(after):.3f} ({better} of {len(after)} higher) |"
    )


if __name__ == "__main__":
    main(sys.argv[1])
