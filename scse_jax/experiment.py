"""Trains and scores several configs over the same patient-wise folds, and compares them.

    python -m scse_jax.experiment --config configs/mr_unet.py --config configs/mr_scse.py \\
        --out runs/mr_study --folds 5 --set data.root=../shared/data/chaos_mr_t2 --set data.image_size=128

Each (config, fold) run lives in ``<out>/<config name>/fold<k>`` and is resumable: a killed
study started again with the same command skips finished runs (those with
``test_scores.csv``) and resumes the unfinished one from its checkpoint. At the end it writes
``results.md`` (mean +- std over held-out patients per organ, a paired test across patients),
``results.csv`` (every patient and organ), ``loss_curves.png`` and side-by-side overlays.
"""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import ml_collections
import numpy as np

from scse_jax import evaluate, plots, train
from scse_jax.errors import ConfigError, ScseError

SUMMARY_METRICS = ("dice", "jaccard", "assd", "mssd")


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file, as ``launch.py --config`` would load it."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    project_root = str(path.parent.parent)
    if project_root not in sys.path:
        sys.path.insert(0, project_root)  # configs import configs.default
    spec = importlib.util.spec_from_file_location(f"_experiment_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> None:
    """Applies ``group.field=value`` (a Python literal, or else a string) to a config."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected group.field=value")
    key, text = assignment.split("=", 1)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *groups, name = key.split(".")
    node = config
    try:
        for group in groups:
            node = node[group]
        if name not in node:
            raise KeyError(name)
        node[name] = value
    except (KeyError, AttributeError) as error:
        raise ConfigError(f"--set {key}: no such config field") from error
    except TypeError as error:
        raise ConfigError(f"--set {key}={text}: {error}") from error


def run_fold(config: ml_collections.ConfigDict, workdir: Path) -> list[dict]:
    """Trains (or resumes) one run and scores its best checkpoint on the held-out patients."""
    scores_path = workdir / "test_scores.csv"
    if scores_path.exists():
        with scores_path.open() as stream:
            return [_typed_row(row) for row in csv.DictReader(stream)]
    train.train_and_evaluate(config, workdir)
    rows, _, _, _ = evaluate.score_checkpoint(workdir, split="test", which="best")
    evaluate.write_csv(rows, scores_path)
    return rows


def _typed_row(row: dict) -> dict:
    return {key: (value if key in ("patient", "organ") else float(value)) for key, value in row.items()}


def mean_std(values) -> str:
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        return "n/a"
    return f"{values.mean():.3f} ± {values.std(ddof=1) if values.size > 1 else 0.0:.3f}"


def per_patient_mean(rows: list[dict], metric: str) -> dict[str, float]:
    """Mean over organs of one metric, per patient."""
    patients: dict[str, list[float]] = {}
    for row in rows:
        patients.setdefault(row["patient"], []).append(row[metric])
    return {patient: float(np.mean(values)) for patient, values in patients.items()}


def results_markdown(rows_by_model: dict[str, list[dict]], organs: list[str]) -> str:
    """Per model: mean ± std over held-out patients, per organ and over organs."""
    lines = [
        "| model | organ | Dice | Jaccard | ASSD (mm) | MSSD (mm) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model, rows in rows_by_model.items():
        for organ in organs:
            organ_rows = [row for row in rows if row["organ"] == organ]
            cells = [mean_std(row[m] for row in organ_rows) for m in SUMMARY_METRICS]
            lines.append(f"| {model} | {organ} | " + " | ".join(cells) + " |")
        overall = [mean_std(per_patient_mean(rows, m).values()) for m in SUMMARY_METRICS]
        lines.append(f"| {model} | **mean of organs** | " + " | ".join(f"**{c}**" for c in overall) + " |")
    return "\n".join(lines)


def paired_comparison(rows_a: list[dict], rows_b: list[dict], metric: str = "dice") -> dict[str, float]:
    """B minus A on the per-patient mean over organs: mean difference, wins, Wilcoxon and t-test p."""
    from scipy import stats

    a, b = per_patient_mean(rows_a, metric), per_patient_mean(rows_b, metric)
    patients = sorted(set(a) & set(b))
    diff = np.array([b[p] - a[p] for p in patients])
    result = {"patients": len(patients), "mean_difference": float(diff.mean()), "b_better": int((diff > 0).sum())}
    if len(patients) >= 2 and np.any(diff != 0):
        result["wilcoxon_p"] = float(stats.wilcoxon(diff).pvalue)
        result["paired_t_p"] = float(stats.ttest_rel([b[p] for p in patients], [a[p] for p in patients]).pvalue)
    return result


def plot_study_curves(out: Path, names: list[str], folds: int) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(names), 3.6), dpi=100)
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        for fold in range(folds):
            path = out / name / f"fold{fold}" / "metrics.jsonl"
            if not path.exists():
                continue
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for split, style in (("train", "-"), ("val", "--")):
                points = sorted((r["epoch"], r["loss"]) for r in records if r["split"] == split and "loss" in r)
                if points:
                    ax.plot(*zip(*points), style, color=f"C{fold}", label=f"fold {fold} {split}")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png")
    return out / "loss_curves.png"


def save_comparison_overlays(out: Path, names: list[str], fold: int = 0, count: int = 3) -> list[Path]:
    """image | each model | ground truth for held-out patients of one fold."""
    predictions, cases = {}, None
    for name in names:
        _, by_case, fold_cases, _ = evaluate.score_checkpoint(out / name / f"fold{fold}", split="test")
        predictions[name] = by_case
        cases = fold_cases
    paths = []
    for case in cases[:count]:
        named = {name: predictions[name][case.case_key] for name in names}
        paths.append(plots.save_case_panels(case, named, out / "overlays" / f"fold{fold}_{case.case_key}.png"))
    return paths


def run_study(config_paths: list[str], out: Path, *, folds: int, overrides: list[str]) -> str:
    names = [Path(p).stem for p in config_paths]
    if len(set(names)) != len(names):
        raise ConfigError(f"config names must differ: {names}")
    configs = {}
    for name, path in zip(names, config_paths):
        config = load_config_file(path)
        for assignment in overrides:
            apply_override(config, assignment)
        config.data.num_folds = folds
        train.validate_config(config)
        configs[name] = config
    rows_by_model: dict[str, list[dict]] = {name: [] for name in names}
    for fold in range(folds):
        for name in names:
            config = ml_collections.ConfigDict(configs[name].to_dict())
            config.data.fold = fold
            print(f"== {name}, fold {fold + 1}/{folds} ==", flush=True)
            rows = run_fold(config, out / name / f"fold{fold}")
            rows_by_model[name] += [{**row, "fold": fold} for row in rows]

    organs = list(dict.fromkeys(row["organ"] for rows in rows_by_model.values() for row in rows))
    all_rows = [{"model": name, **row} for name, rows in rows_by_model.items() for row in rows]
    _write_all_rows(all_rows, out / "results.csv")
    command = "python -m scse_jax.experiment " + " ".join(
        [f"--config {p}" for p in config_paths] + [f"--out {out}", f"--folds {folds}"]
        + [f"--set {shlex.quote(o)}" for o in overrides]
    )
    report = [
        "# Patient-wise cross-validation",
        "",
        f"Reproduce: `{command}`",
        "",
        f"{folds} folds; each patient is scored once, by the fold that held it out (best checkpoint by "
        "validation Dice). Metrics at native resolution, CHAOS definitions; mean ± std over patients.",
        "",
        results_markdown(rows_by_model, organs),
    ]
    if len(names) == 2:
        comparison = paired_comparison(rows_by_model[names[0]], rows_by_model[names[1]])
        report += ["", f"Paired comparison across patients, {names[1]} minus {names[0]} (mean Dice over organs):",
                   "", "```", json.dumps(comparison, indent=2), "```"]
    text = "\n".join(report) + "\n"
    (out / "results.md").write_text(text)
    plot_study_curves(out, names, folds)
    save_comparison_overlays(out, names)
    return text


def _write_all_rows(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scse_jax.experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="a config file; repeat to compare")
    parser.add_argument("--out", required=True, type=Path, help="study folder (resumable)")
    parser.add_argument("--folds", type=int, default=5, help="patient-wise folds")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override for every config")
    args = parser.parse_args(argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        print(run_study(args.config, args.out, folds=args.folds, overrides=args.set))
    except ScseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
