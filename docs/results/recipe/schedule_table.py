"""The schedule experiment's table: mean Dice over organs (largest component kept) of each test
patient of folds 0 and 2, seed 0, for the 24-epoch schedule (the stopped study's runs,
`../mr_t2_cpu_study_gin24_runs/`) and the 28-epoch one (`schedule28_*_test.csv`).

    python docs/results/recipe/schedule_table.py
"""

import csv
import statistics
from pathlib import Path

HERE = Path(__file__).parent


def patient_means(path, postprocess=None):
    dice = {}
    for row in csv.DictReader(open(path)):
        if postprocess is None or row["postprocess"] == postprocess:
            dice.setdefault(row["patient"], []).append(float(row["dice"]))
    return {patient: statistics.mean(values) for patient, values in dice.items()}


def main():
    print("| model | fold | patient | 24 epochs, halved every 6 | 28 epochs, halved every 7 |")
    print("| --- | --- | --- | --- | --- |")
    before, after = [], []
    for model in ("unet", "scse"):
        for fold in (0, 2):
            old = patient_means(
                HERE.parent / f"mr_t2_cpu_study_gin24_runs/mr_{model}_cpu/seed0/fold{fold}/test_scores.csv",
                "largest_component",
            )
            new = patient_means(HERE / f"schedule28_{model}_fold{fold}_test.csv")
            for patient in sorted(new, key=int):
                print(f"| {model} | {fold} | {patient} | {old[patient]:.3f} | {new[patient]:.3f} |")
                before.append(old[patient])
                after.append(new[patient])
    better = sum(a > b for a, b in zip(after, before))
    print(f"| mean of {len(after)} | | | {statistics.mean(before):.3f} | {statistics.mean(after):.3f} ({better} of {len(after)} higher) |")


if __name__ == "__main__":
    main()
