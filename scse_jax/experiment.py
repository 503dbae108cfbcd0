"""Trains and scores several configs over the same patient-wise folds and seeds, and compares them.

    python -m scse_jax.experiment --config configs/mr_unet_cpu.py --config configs/mr_scse_cpu.py \\
        --out runs/mr_study --folds 5 --seeds 0,1 --config.data.root=../shared/data/chaos_mr_t2

Each (config, seed, fold) run lives in ``<out>/<config name>/seed<s>/fold<k>`` and is
resumable: a study started again with the same command skips finished runs (those with
``test_scores.csv``, written only after training ended and the test patients were scored) and
resumes the unfinished one from its checkpoint; a run stopped by SIGTERM/Ctrl-C is not scored.
Test patients are scored from each config's ``eval.checkpoint`` (best or latest), with and
without keeping each organ's largest connected component; ``--rescore`` scores finished runs
again after that choice changed (with ``--report-only``, training nothing).
At the end it writes ``results.md`` (mean +- std over held-out patients and seeds per organ,
per-seed means, post-processing on/off, minutes per run, a paired test of each config against
the one before it), ``results.csv`` (every patient, organ,
seed and post-processing), ``loss_curves.png`` and side-by-side overlays; ``--report-only``
writes them from the runs finished so far, marked partial; the overlays are drawn once the first
seed's fold-0 runs are finished, from their checkpoints. Overrides (``--config.field=value``,
as launch.py takes them) apply to every config.
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX is imported (below): see scse_jax/hugepages.py
    from scse_jax import hugepages

    hugepages.restart_with_hugepages("scse_jax.experiment")

import argparse
import csv
import json
import math
import shlex
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np

from scse_jax import checkpoint, compilation, cpu_layout, evaluate, files, plots, tables, train
from scse_jax.config_files import apply_overrides, is_override, load_config_file
from scse_jax.errors import ConfigError, RunStopped, ScseError

# Written by run_fold beside test_scores.csv: seconds of training and scoring, and whether the
# run started without a saved step (a resumed run's seconds are only its last part).
RUN_TIME = "run_time.json"
SCORES = "test_scores.csv"  # a finished run's test patients' scores; its presence marks it finished
SUMMARY_METRICS = ("dice", "jaccard", "ravd", "assd", "mssd", "volume_ratio")


# Test scores are written with and without post-processing, so a study measures both.
POSTPROCESSING = {"none": False, "largest_component": True}


def run_fold(config: ml_collections.ConfigDict, workdir: Path, *, rescore: bool = False) -> list[dict]:
    """Trains (or resumes) one run and scores its ``eval.checkpoint`` (best or latest) on the
    held-out patients, once per POSTPROCESSING choice (column "postprocess"), from one
    prediction per patient; the rows name the checkpoint ("checkpoint", "step").

    A finished run's scores are read back, or with ``rescore`` scored again where they are not
    of the config's checkpoint choice; the earlier file is kept beside them as
    ``test_scores.replaced-<UTC time>.csv``. A run stopped by SIGTERM/SIGINT raises RunStopped
    from training and is never scored, so the next call resumes it.
    """
    scores_path = workdir / SCORES
    which = config.eval.checkpoint
    if scores_path.exists():
        with scores_path.open() as stream:
            # Scores from before the "checkpoint" column are of the best checkpoint.
            rows = [{"checkpoint": "best", **_typed_row(row)} for row in csv.DictReader(stream)]
        if not rescore or all(row["checkpoint"] == which for row in rows):
            return rows
        if not checkpoint.has_saved_step(workdir):
            raise ConfigError(
                f"{workdir}: its scores are not of the {which} checkpoint and cannot be scored again: its "
                "checkpoints are not there (--rescore needs the runs' checkpoints and the data)"
            )
        print(f"{workdir}: scoring the {which} checkpoint again", flush=True)
        return _score_fold(workdir, which, replaced=scores_path.read_text())
    started_fresh = not checkpoint.has_saved_step(workdir)
    start = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    trained = time.perf_counter()
    rows = _score_fold(workdir, which)
    files.write_text(workdir / RUN_TIME, json.dumps({
        "train_s": trained - start, "score_s": time.perf_counter() - trained, "started_fresh": started_fresh,
    }) + "\n")
    return rows


def _score_fold(workdir: Path, which: str, *, replaced: str | None = None) -> list[dict]:
    """Scores a trained run's test patients and writes SCORES, keeping ``replaced`` (the
    earlier file's text) under a name of its own first."""
    scored, step = evaluate.score_checkpoint_postprocessings(workdir, POSTPROCESSING, split="test", which=which)
    rows = [
        {**row, "postprocess": name, "checkpoint": which, "step": step}
        for name, of_choice in scored.items()
        for row in of_choice
    ]
    if replaced is not None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        with (workdir / f"test_scores.replaced-{stamp}.csv").open("x") as stream:
            stream.write(replaced)
    tables.write_csv(rows, workdir / SCORES)
    return rows


def run_minutes(workdirs: list[Path]) -> str:
    """Median minutes (training + scoring) of the runs trained from scratch in one go."""
    minutes = []
    for workdir in workdirs:
        path = workdir / RUN_TIME
        if path.exists():
            timing = json.loads(path.read_text())
            if timing["started_fresh"]:
                minutes.append((timing["train_s"] + timing["score_s"]) / 60)
    if not minutes:
        return f"not timed (no {RUN_TIME} from a run trained from scratch in one go)"
    return f"median {np.median(minutes):.1f} (range {min(minutes):.1f}-{max(minutes):.1f}, {len(minutes)} run{'s' if len(minutes) > 1 else ''})"


def _typed_row(row: dict) -> dict:
    text = ("patient", "organ", "postprocess", "checkpoint")
    return {key: value if key in text else int(value) if key == "step" else float(value) for key, value in row.items()}


def mean_std(values) -> str:
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        return "n/a"
    return f"{values.mean():.3f} ± {values.std(ddof=1) if values.size > 1 else 0.0:.3f}"


def per_patient_mean(rows: list[dict], metric: str) -> dict[tuple, float]:
    """Mean over organs of one metric, per (patient, seed)."""
    patients: dict[tuple, list[float]] = {}
    for row in rows:
        patients.setdefault((row["patient"], int(row.get("seed", 0))), []).append(row[metric])
    return {key: float(np.mean(values)) for key, values in patients.items()}


def seed_means(rows: list[dict], metric: str = "dice") -> dict[int, float]:
    """Per seed, the mean over patients of the per-patient mean over organs."""
    by_seed: dict[int, list[float]] = {}
    for (_, seed), value in per_patient_mean(rows, metric).items():
        by_seed.setdefault(seed, []).append(value)
    return {seed: float(np.mean(values)) for seed, values in sorted(by_seed.items())}


def results_markdown(rows_by_model: dict[str, list[dict]], organs: list[str]) -> str:
    """Per model: mean ± std over held-out patients and seeds (one value per patient and seed),
    per organ and over organs, and the predicted / true volume."""
    header = ("model", "organ", "Dice", "Jaccard", "RAVD (%)", "ASSD (mm)", "MSSD (mm)", "volume ratio")
    cells = []
    for model, rows in rows_by_model.items():
        for organ in organs:
            of_organ = tables.organ_rows(rows, organ)
            cells.append([model, organ] + [mean_std(row[m] for row in of_organ) for m in SUMMARY_METRICS])
        overall = [mean_std(per_patient_mean(rows, m).values()) for m in SUMMARY_METRICS]
        cells.append([model, "**mean of organs**"] + [f"**{cell}**" for cell in overall])
    return tables.render(header, cells).rstrip("\n")


def paired_comparison(rows_a: list[dict], rows_b: list[dict], metric: str = "dice") -> dict[str, float]:
    """B minus A on the per-(patient, seed) mean over organs: mean difference, wins, Wilcoxon
    and t-test p over every pair; and the same test on patients' means over seeds (pairs of one
    patient are not independent, so that one is the conservative reading)."""
    from scipy import stats

    a, b = per_patient_mean(rows_a, metric), per_patient_mean(rows_b, metric)
    pairs = sorted(set(a) & set(b))
    diff = np.array([b[key] - a[key] for key in pairs])
    result = {
        "pairs": len(pairs),
        "patients": len({patient for patient, _ in pairs}),
        "mean_difference": float(diff.mean()) if len(pairs) else math.nan,
        "b_better": int((diff > 0).sum()),
    }
    if len(pairs) >= 2 and np.any(diff != 0):
        result["wilcoxon_p"] = float(stats.wilcoxon(diff).pvalue)
        result["paired_t_p"] = float(stats.ttest_rel([b[k] for k in pairs], [a[k] for k in pairs]).pvalue)
    patient_diff: dict[str, list[float]] = {}
    for (patient, _), value in zip(pairs, diff):
        patient_diff.setdefault(patient, []).append(value)
    by_patient = np.array([np.mean(values) for values in patient_diff.values()])
    if len(by_patient) >= 2 and np.any(by_patient != 0):
        result["patient_means_wilcoxon_p"] = float(stats.wilcoxon(by_patient).pvalue)
    return result


def paired_comparison_lines(chosen: dict[str, list[dict]]) -> list[str]:
    """The report's paired comparisons: each config minus the one before it, in the order given
    (U-Net, scSE, a variant of scSE: each change against the model it changes)."""
    names = list(chosen)
    lines = []
    for before, after in zip(names, names[1:]):
        comparison = paired_comparison(chosen[before], chosen[after])
        lines += ["", f"Paired comparison, {after} minus {before} (mean Dice over organs per patient and seed):",
                  "", "```", json.dumps(comparison, indent=2), "```"]
    return lines


def run_dir(out: Path, name: str, seed: int, fold: int) -> Path:
    return out / name / f"seed{seed}" / f"fold{fold}"


def plot_study_curves(out: Path, names: list[str], seeds: list[int], folds: int) -> Path:
    """Train (solid) and validation (dashed) loss per epoch of every run, one panel per config."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(names), 3.6), dpi=100)
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        for seed in seeds:
            for fold in range(folds):
                path = run_dir(out, name, seed, fold) / "metrics.jsonl"
                if not path.exists():
                    continue
                records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                for split, style in (("train", "-"), ("val", "--")):
                    points = plots.loss_points(records, split)
                    label = f"fold {fold} {split}" if seed == seeds[0] else None
                    if points:
                        ax.plot(*zip(*points), style, color=f"C{fold}", alpha=0.8, label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return plots.save_figure(fig, out / "loss_curves.png")


def save_comparison_overlays(out: Path, checkpoints: dict[str, str], seed: int, fold: int, count: int = 3) -> list[Path]:
    """image | each model (from the checkpoint its scores came from, ``checkpoints[name]``) |
    ground truth for held-out patients of one fold."""
    names = list(checkpoints)
    predictions, cases = {}, None
    for name in names:
        _, by_case, fold_cases, _ = evaluate.score_checkpoint(
            run_dir(out, name, seed, fold), split="test", which=checkpoints[name]
        )
        predictions[name] = by_case
        cases = fold_cases
    paths = []
    for case in cases[:count]:
        named = {name: predictions[name][case.case_key] for name in names}
        paths.append(plots.save_case_panels(case, named, out / "overlays" / f"fold{fold}_{case.case_key}.png"))
    return paths


def study_batch_sizes(config_paths: list[str], overrides: list[str]) -> list[int]:
    """Every config's train and eval batch: what a CPU layout's device count must divide."""
    sizes = []
    for path in config_paths:
        config = load_config_file(path)
        apply_overrides(config, overrides)
        sizes += [config.train.batch_size, config.eval.batch_size]
    return sizes


def load_study_configs(config_paths: list[str], overrides: list[str], folds: int) -> dict[str, ml_collections.ConfigDict]:
    names = [Path(p).stem for p in config_paths]
    if len(set(names)) != len(names):
        raise ConfigError(f"config names must differ: {names}")
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2 (each patient is tested once), got {folds}")
    configs = {}
    for name, path in zip(names, config_paths):
        config = load_config_file(path)
        apply_overrides(config, overrides)
        config.data.num_folds = folds
        train.validate_config(config)
        configs[name] = config
    return configs


def run_study(
    config_paths: list[str],
    out: Path,
    *,
    folds: int,
    seeds: list[int],
    overrides: list[str],
    report_only: bool = False,
    rescore: bool = False,
) -> str:
    """Trains every (seed, fold, config) run not yet finished, then writes the report.

    With ``report_only`` nothing is trained: the report covers the finished runs and says so
    when some are missing ("partial"). With ``rescore`` finished runs scored from another
    checkpoint than their config's eval.checkpoint are scored again (`run_fold`).
    """
    configs = load_study_configs(config_paths, overrides, folds)
    names = list(configs)
    compilation.use_compilation_cache(next(iter(configs.values())).data)
    rows_by_model: dict[str, list[dict]] = {name: [] for name in names}
    missing = []
    for seed in seeds:
        for fold in range(folds):
            for name in names:
                workdir = run_dir(out, name, seed, fold)
                if report_only and not (workdir / SCORES).exists():
                    missing.append(f"{name} seed {seed} fold {fold}")
                    continue
                config = ml_collections.ConfigDict(configs[name].to_dict())
                config.data.fold = fold
                config.train.seed = seed
                print(f"== {name}, seed {seed}, fold {fold + 1}/{folds} ==", flush=True)
                rows = run_fold(config, workdir, rescore=rescore)
                rows_by_model[name] += [{**row, "seed": seed, "fold": fold} for row in rows]

    all_rows = [{"model": name, **row} for name, rows in rows_by_model.items() for row in rows]
    if not all_rows:
        raise ConfigError(f"no finished runs in {out} to report on")
    tables.write_csv(all_rows, out / "results.csv")
    chosen = {
        name: [r for r in rows if r["postprocess"] == _postprocess_name(configs[name])]
        for name, rows in rows_by_model.items()
    }
    organs = list(dict.fromkeys(row["organ"] for rows in chosen.values() for row in rows))
    command = "python -m scse_jax.experiment " + " ".join(
        [f"--config {p}" for p in config_paths]
        + [f"--out {out}", f"--folds {folds}", f"--seeds {','.join(map(str, seeds))}"]
        + [shlex.quote(o) for o in overrides]
    )
    title = "# Patient-wise cross-validation" + (" (partial)" if missing else "")
    report = [title, "", f"Reproduce: `{command}`", ""]
    if missing:
        report += [f"**Partial**: {len(missing)} of {len(seeds) * folds * len(names)} runs not finished yet "
                   f"({'; '.join(missing)}).", ""]
    report += [
        f"{folds} folds x seeds {', '.join(map(str, seeds))}; each patient is scored once per seed, by the "
        "fold that held it out. Checkpoint scored: "
        + ", ".join(f"{name} {_checkpoint_description(rows)}" for name, rows in rows_by_model.items())
        + ". Metrics at native resolution, CHAOS definitions; mean ± std over (patient, seed) pairs. "
        "Post-processing: " + ", ".join(f"{name} {_postprocess_name(configs[name])}" for name in names) + ".",
        "",
        results_markdown(chosen, organs),
        "",
        "Mean Dice over organs, per seed (mean over patients):",
        "",
    ]
    report += [f"- {name}: " + ", ".join(f"seed {seed} {value:.3f}" for seed, value in seed_means(rows).items())
               for name, rows in chosen.items()]
    report += ["", "Post-processing, mean Dice over organs and patients (none -> largest component):", ""]
    for name, rows in rows_by_model.items():
        by_choice = {choice: seed_means([r for r in rows if r["postprocess"] == choice]) for choice in POSTPROCESSING}
        report.append(f"- {name}: " + " -> ".join(
            f"{np.mean(list(values.values())):.3f}" for values in by_choice.values() if values
        ))
    report += ["", "Minutes per run, training and scoring the test patients, on the machine that ran it:", ""]
    report += [f"- {name}: " + run_minutes([run_dir(out, name, seed, fold) for seed in seeds for fold in range(folds)])
               for name in names]
    report += paired_comparison_lines(chosen)
    overlay_runs = [run_dir(out, name, seeds[0], 0) for name in names]
    overlays_ready = all((w / SCORES).exists() and checkpoint.has_saved_step(w) for w in overlay_runs)
    report += ["", f"Overlays (`overlays/`): held-out patients of seed {seeds[0]}, fold 0, "
               + ("image | each model | ground truth." if overlays_ready
                  else "not drawn: those runs are unfinished or their checkpoints are absent.")]
    text = "\n".join(report) + "\n"
    files.write_text(out / "results.md", text)
    plot_study_curves(out, names, seeds, folds)
    if overlays_ready:
        overlay_checkpoints = {
            name: next(r["checkpoint"] for r in rows if r["seed"] == seeds[0] and r["fold"] == 0)
            for name, rows in rows_by_model.items()
        }
        save_comparison_overlays(out, overlay_checkpoints, seeds[0], 0)
    return text


def _checkpoint_description(rows: list[dict]) -> str:
    """How a model's runs were scored: "latest", "best (by validation Dice)", or a mix, counted."""
    runs: dict[str, set] = {}
    for row in rows:
        runs.setdefault(row["checkpoint"], set()).add((row["seed"], row["fold"]))
    if not runs:
        return "no finished run"
    named = {choice: "best (by validation Dice)" if choice == "best" else choice for choice in runs}
    if len(runs) == 1:
        return next(iter(named.values()))
    mix = " and ".join(f"{named[choice]} in {len(keys)} runs" for choice, keys in sorted(runs.items()))
    return f"MIXED, {mix} (--rescore scores them all from the config's eval.checkpoint)"


def _postprocess_name(config: ml_collections.ConfigDict) -> str:
    return "largest_component" if config.eval.get("largest_component", False) else "none"


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give one or more distinct seeds")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scse_jax.experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="a config file; repeat to compare")
    parser.add_argument("--out", required=True, type=Path, help="study folder (resumable)")
    parser.add_argument("--folds", type=int, default=5, help="patient-wise folds")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    parser.add_argument(
        "--rescore", action="store_true",
        help="score finished runs again where their scores are not of the config's eval.checkpoint (best or "
        "latest); the earlier scores are kept beside them; with --report-only nothing is trained",
    )
    parser.add_argument(
        "--cpu-devices", default=cpu_layout.AUTO,
        help="JAX devices on the CPU: auto (one per physical core, as many as divide the batches) or a count, "
        "as launch.py --cpu_devices",
    )  # fmt: skip
    parser.epilog = "--config.FIELD=VALUE (repeatable): an override for every config, as launch.py takes it"
    args, unknown = parser.parse_known_args(argv)
    overrides = [argument for argument in unknown if is_override(argument)]
    if len(overrides) < len(unknown):
        parser.error(f"unrecognized arguments: {' '.join(a for a in unknown if not is_override(a))}")
    try:
        cpu_layout.set_up(args.cpu_devices, study_batch_sizes(args.config, overrides))
        seeds = parse_seeds(args.seeds)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"--out {args.out}: cannot create the study folder ({error.strerror or error})") from error
        print(run_study(
            args.config, args.out, folds=args.folds, seeds=seeds, overrides=overrides,
            report_only=args.report_only, rescore=args.rescore,
        ))
    except RunStopped as stopped:
        print(f"{stopped}; the same experiment command resumes the study", file=sys.stderr)
        return 1
    except ScseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
