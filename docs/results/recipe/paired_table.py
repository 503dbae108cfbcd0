"""A recipe experiment's table: mean Dice over organs (largest component kept) of each test
patient of folds 0 and 2, seed 0, before and after one change.

    python docs/results/recipe/paired_table.py schedule28    # 24 epochs halved every 6 -> 28 halved every 7
    python docs/results/recipe/paired_table.py soft_labels   # picked classes -> class shares
    python docs/results/recipe/paired_table.py checkpoint 1  # the study's seed-1 runs: best -> latest checkpoint
    python docs/results/recipe/paired_table.py studies BEFORE_RUNS AFTER_RUNS 0  # two studies' seed-0 runs
    python docs/results/recipe/paired_table.py studies BEFORE_RUNS AFTER_RUNS 0 15  # and their mean without patient 15

For an experiment, "before" is a study's run (the scores of its best checkpoint, the
largest-component rows) and "after" the experiment's `evaluate --checkpoint` CSV in this folder,
which keeps the largest component as the recipe's config says. For two studies, each run's own
`test_scores.csv` (largest-component rows), which must be of the same checkpoint (best or latest).
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


def checkpoints_scored(path):
    """The checkpoints ("best", "latest") whose scores a run's CSV holds."""
    return {row.get("checkpoint", "best") for row in csv.DictReader(open(path))}


def patient_means(path, postprocess=None):
    dice = {}
    for row in csv.DictReader(open(path)):
        if postprocess is None or row["postprocess"] == postprocess:
            dice.setdefault(row["patient"], []).append(float(row["dice"]))
    return {patient: statistics.mean(values) for patient, values in dice.items()}


def best_checkpoint_scores(run):
    """A study run's scores of its best checkpoint, which these experiments were compared with:
    the file `experiment --rescore` kept, where the run was scored again from another one."""
    replaced = sorted(run.glob("test_scores.replaced-*.csv"))
    return replaced[0] if replaced else run / "test_scores.csv"


def print_pairs(title_before, title_after, runs, left_out=None):
    """The table of (model, fold, patient) pairs: ``runs`` yields (model, fold, before, after),
    each a {patient: mean Dice}; the patients are those of ``after``. With ``left_out`` (a
    patient id), a second mean line leaves that patient's pairs out."""
    print(f"| model | fold | patient | {title_before} | {title_after} |")
    print("| --- | --- | --- | --- | --- |")
    pairs = []
    for model, fold, old, new in runs:
        for patient in sorted(new, key=int):
            print(f"| {model} | {fold} | {patient} | {old[patient]:.3f} | {new[patient]:.3f} |")
            pairs.append((patient, old[patient], new[patient]))
    if not pairs:
        sys.exit("no finished pairs")
    print_mean(f"mean of {len(pairs)}", pairs)
    if left_out is not None:
        kept = [pair for pair in pairs if pair[0] != left_out]
        print_mean(f"mean of {len(kept)}, without patient {left_out}", kept)


def print_mean(title, pairs):
    before = [old for _, old, _ in pairs]
    after = [new for _, _, new in pairs]
    higher = sum(a > b for a, b in zip(after, before))
    lower = sum(a < b for a, b in zip(after, before))
    print(
        f"| {title} | | | {statistics.mean(before):.4f} | "
        f"{statistics.mean(after):.4f} ({higher} higher, {lower} lower) |"
    )


def experiment_runs(name):
    """Folds 0 and 2 of seed 0: the study's run against the experiment's CSV."""
    _, study, prefix = EXPERIMENTS[name]
    for model in ("unet", "scse"):
        for fold in (0, 2):
            run = HERE.parent / f"{study}/mr_{model}_cpu/seed0/fold{fold}"
            old = patient_means(best_checkpoint_scores(run), "largest_component")
            yield model, fold, old, patient_means(HERE / f"{prefix}_{model}_fold{fold}_test.csv")


def checkpoint_runs(seed):
    """Every rescored run of the study of one seed: its best checkpoint's scores (the file
    `experiment --rescore` kept) against its latest checkpoint's."""
    for model in ("unet", "scse"):
        for run in sorted((HERE.parent / "mr_t2_cpu_study_runs" / f"mr_{model}_cpu" / f"seed{seed}").glob("fold*")):
            if list(run.glob("test_scores.replaced-*.csv")):
                old = patient_means(best_checkpoint_scores(run), "largest_component")
                yield model, run.name[4:], old, patient_means(run / "test_scores.csv", "largest_component")


def study_runs(before, after, seed):
    """Two studies' runs of one seed (each its runs folder: MODEL/seedS/foldK/test_scores.csv),
    every run that ``after`` has finished, as each scored it (the largest component kept)."""
    for model in ("unet", "scse"):
        for new in sorted((Path(after) / f"mr_{model}_cpu" / f"seed{seed}").glob("fold*/test_scores.csv")):
            fold = new.parent.name
            old = Path(before) / f"mr_{model}_cpu" / f"seed{seed}" / fold / "test_scores.csv"
            if not old.exists():
                sys.exit(f"{old} is missing: the studies do not pair")
            if checkpoints_scored(old) != checkpoints_scored(new):
                sys.exit(f"{old} and {new} score different checkpoints")
            yield model, fold[4:], patient_means(old, "largest_component"), patient_means(new, "largest_component")


if __name__ == "__main__":
    if sys.argv[1] == "checkpoint":
        print_pairs("best checkpoint", "latest checkpoint", checkpoint_runs(int(sys.argv[2])))
    elif sys.argv[1] == "studies":
        left_out = sys.argv[5] if len(sys.argv) > 5 else None
        print_pairs("before", "after", study_runs(sys.argv[2], sys.argv[3], int(sys.argv[4])), left_out)
    else:
        print_pairs(*EXPERIMENTS[sys.argv[1]][0], experiment_runs(sys.argv[1]))
