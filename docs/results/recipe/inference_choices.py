"""Held-out Dice of trained runs under two inference choices (`inference_choices_rule.md`):
the best or the latest checkpoint, with or without the test-time shifts
(`prediction.TTA_SHIFTS`). Each run's test patients; mean Dice over organs, largest component
kept (the recipes' post-processing). Writes OUT.json as it goes and prints the paired tables.

    python docs/results/recipe/inference_choices.py OUT.json RUN [RUN ...]

Runs are named model/seedS/foldK (the last three parts of their paths); one already in
OUT.json is not scored again, so the script can be stopped and rerun, and
given new runs later.
"""

import json
import statistics
import sys
from pathlib import Path

from scse_jax import evaluate
from scse_jax.data.run_data import prepare_split
from scse_jax.inference import Segmenter

CHOICES = ("best", "best+shifts", "latest", "latest+shifts")


def score_run(run):
    """{choice: {patient: mean Dice}} and the steps of the two checkpoints."""
    scores, steps, cases = {}, {}, None
    for which in ("best", "latest"):
        segmenter = Segmenter.from_checkpoint(run, which=which, largest_component=True)
        steps[which] = segmenter.step
        cases = cases or prepare_split(evaluate.config_on_this_machine(segmenter.config), "test")
        for tta in (False, True):
            scores[which + ("+shifts" if tta else "")] = {
                case.patient: evaluate.mean_dice(
                    segmenter.segment_to_native(case.images, case.native_shape[1:], tta=tta), case, segmenter.class_names
                )
                for case in cases
            }
    return {"steps": steps, "dice": scores}


def print_tables(result):
    pairs = [
        (run, patient) for run in sorted(result) for patient in sorted(result[run]["dice"]["best"], key=int)
    ]
    print("| run | patient | " + " | ".join(CHOICES) + " |")
    print("|" + " --- |" * (2 + len(CHOICES)))
    for run, patient in pairs:
        cells = " | ".join(f"{result[run]['dice'][choice][patient]:.3f}" for choice in CHOICES)
        print(f"| {run} | {patient} | {cells} |")
    base = [result[run]["dice"]["best"][patient] for run, patient in pairs]
    print(f"\n{len(pairs)} (run, test patient) pairs; mean Dice, and against the best checkpoint without shifts:")
    for choice in CHOICES:
        values = [result[run]["dice"][choice][patient] for run, patient in pairs]
        higher = sum(v > b for v, b in zip(values, base))
        lower = sum(v < b for v, b in zip(values, base))
        print(
            f"  {choice:14s} {statistics.mean(values):.4f}  difference {statistics.mean(values) - statistics.mean(base):+.4f}, "
            f"higher for {higher}, lower for {lower} of {len(pairs)}"
        )
    print("\nMean Dice per model:")
    for model in sorted({run.split("/")[0] for run in result}):
        means = [
            statistics.mean(result[run]["dice"][choice][p] for run, p in pairs if run.startswith(model + "/"))
            for choice in CHOICES
        ]
        print(f"  {model}: " + ", ".join(f"{choice} {mean:.4f}" for choice, mean in zip(CHOICES, means)))


def main(out, runs):
    out = Path(out)
    result = json.loads(out.read_text()) if out.exists() else {}
    for run in runs:
        key = "/".join(Path(run).parts[-3:])  # model/seedS/foldK
        if key in result:
            continue
        print(f"scoring {key}", flush=True)
        result[key] = score_run(run)
        partial = out.with_suffix(".partial")
        partial.write_text(json.dumps(result, indent=1))
        partial.replace(out)
    print_tables(result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
