"""Prints the table of docs/results/intensity_augmentation.md from the CSVs and metrics beside it.

    python docs/results/augmentation/table.py
"""

import csv
import json
import pathlib
import statistics

HERE = pathlib.Path(__file__).parent
AUGMENTATIONS = ("jitter", "nnunet", "gin", "gin_context1", "gin_ema", "gin_signalloss")


def patient_dice(path):
    """Mean Dice over organs per patient, largest component kept (the study CSVs hold both)."""
    per_patient = {}
    for row in csv.DictReader(open(path)):
        if row.get("postprocess", "largest_component") == "largest_component":
            per_patient.setdefault(row["patient"], []).append(float(row["dice"]))
    return {patient: statistics.mean(dice) for patient, dice in per_patient.items()}


def validation_best_last(path):
    dice = [statistics.mean(r["dice"].values()) for r in map(json.loads, open(path)) if r["split"] == "val"]
    return f"{max(dice):.3f} / {dice[-1]:.3f}"


def main():
    print("| fold | patient | " + " | ".join(AUGMENTATIONS) + " |")
    print("| --- " * (2 + len(AUGMENTATIONS)) + "|")
    test = {}
    for fold in range(3):
        runs = {a: patient_dice(HERE / f"{a}_fold{fold}_test.csv") for a in AUGMENTATIONS
                if (HERE / f"{a}_fold{fold}_test.csv").exists()}
        for a, scores in runs.items():
            test.setdefault(a, []).extend(scores.values())
        for patient in runs["jitter"]:
            cells = [f"{runs[a][patient]:.3f}" if a in runs else "" for a in AUGMENTATIONS]
            print(f"| {fold} | {patient} | " + " | ".join(cells) + " |")
        cells = [validation_best_last(HERE / f"{a}_fold{fold}_metrics.jsonl") if a in runs else "" for a in AUGMENTATIONS]
        print(f"| {fold} | validation, best / last | " + " | ".join(cells) + " |")
    cells = [f"{statistics.mean(test[a]):.3f}" if len(test.get(a, ())) == 9 else "" for a in AUGMENTATIONS]
    print("| | mean of the 9 test patients | " + " | ".join(cells) + " |")
    folds_0_2 = {a: {**patient_dice(HERE / f"{a}_fold0_test.csv"), **patient_dice(HERE / f"{a}_fold2_test.csv")}
                 for a in AUGMENTATIONS if (HERE / f"{a}_fold0_test.csv").exists() and (HERE / f"{a}_fold2_test.csv").exists()}
    for label, keep in (("folds 0 and 2, 6 test patients", lambda p: True), ("folds 0 and 2 without patient 15", lambda p: p != "15")):
        cells = [f"{statistics.mean(v for p, v in folds_0_2[a].items() if keep(p)):.3f}" if a in folds_0_2 else ""
                 for a in AUGMENTATIONS]
        print(f"| | mean, {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
