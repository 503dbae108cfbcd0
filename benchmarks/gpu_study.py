"""The GPU study in one command: speed in float32 and bfloat16 beside PyTorch, then the MR study.

    benchmarks/gpu_study.sh OUT [--data DIR] [--budget SECONDS] [--work DIR]   # on a machine with one GPU
    benchmarks/gpu_study.sh OUT --dry-run [--data DIR]                         # the same, tiny, on the CPU

Parts, in this order, each a child process whose output goes to ``OUT/gpu_study.log``:

1. ``bench.py --device --compare-torch`` in float32, then in bfloat16: train and inference
   images/s, fraction of the chip's datasheet peak, compile time, input-pipeline waiting, and
   the PyTorch reference (eager and ``torch.compile``) timed in turns with the project's steps.
2. The MR study: ``python -m scse_jax.experiment`` with configs/mr_unet_cpu.py,
   configs/mr_scse_cpu.py and configs/mr_scse_bf16.py (the same scSE computing in bfloat16) at
   ``--study-size`` px for ``--study-epochs`` epochs, ``--study-folds`` patient-wise folds, seeds
   ``--study-seeds``, on ``--data``; its report compares scSE with U-Net and bfloat16 with
   float32. Folds run in order, the three configs per fold; what is left of ``--budget`` bounds it, and a study cut there is stopped with
   SIGTERM (the unfinished run is never scored) and reported from the runs that finished
   (``--report-only``, marked partial; ``gpu_study.json`` says which folds finished).

``OUT`` receives at most eight files, all at its top level (what the lent GPU machine sends
back): gpu_study.json (the summary: every part's status and time, the speed table, the
study's Dice), gpu_study.log, bench_float32.json, bench_bfloat16.json, speed.png,
study_results.md, study_results.csv, study_loss_curves.png. Checkpoints and caches stay in
``--work``. gpu_study.json is rewritten after every part, so a run cut short still leaves one.

``--dry-run`` runs every part on the CPU at 32 px, width 4, one epoch, on built-in synthetic
data (or ``--data`` limited to four patients), so that a typo costs no GPU minute. Its study
is stopped, as a spent budget would stop it, once every config finished the first fold.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from scse_jax import files  # importable: gpu_study.sh puts the checkout on PYTHONPATH

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BENCH = PROJECT_ROOT / "benchmarks" / "bench.py"
# Each is compared with the one before it: scSE with U-Net, bfloat16 with float32 (does bf16 keep Dice?).
STUDY_CONFIGS = ("configs/mr_unet_cpu.py", "configs/mr_scse_cpu.py", "configs/mr_scse_bf16.py")
DTYPES = ("float32", "bfloat16")
# Seconds kept back from the budget for the study's report and this summary.
REPORT_RESERVE_S = 60
# A study given less than this is not started.
MIN_STUDY_S = 90
# After SIGTERM, how long a part may take to save and leave before it is killed.
STOP_GRACE_S = 60


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the JSON, PNGs, study tables and log (at most 8 files)")
    parser.add_argument("--dry-run", action="store_true", help="every part, tiny, on the CPU")
    parser.add_argument("--data", type=Path, help="CHAOS MR T2 NIfTI folder (image_<id>/label_<id>.nii.gz)")
    parser.add_argument("--work", type=Path, help="checkpoints and caches (default: $TMPDIR/scse_gpu_study)")
    parser.add_argument("--budget", type=float, help="seconds for everything (default 540; dry run 1800)")
    parser.add_argument("--bench-timeout", type=float, help="seconds one bench.py run may take (default 210; dry run 600)")
    parser.add_argument("--study-folds", type=int, default=5, help="patient-wise folds (each patient tested once)")
    parser.add_argument("--study-seeds", default="0", help="training seeds, e.g. 0,1")
    parser.add_argument("--study-epochs", type=int, default=30)
    parser.add_argument("--study-size", type=int, default=256, help="training grid in pixels")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: bench,study")
    parser.add_argument("--python", default=sys.executable, help="the interpreter for every part")
    parser.epilog = "--config.FIELD=VALUE (repeatable): another override for the study, as experiment takes it"
    args, unknown = parser.parse_known_args(argv)
    args.study_overrides = [argument for argument in unknown if argument.startswith("--config.")]
    if len(args.study_overrides) < len(unknown):
        parser.error(f"unrecognized arguments: {' '.join(a for a in unknown if a not in args.study_overrides)}")
    if args.budget is None:
        args.budget = 1800.0 if args.dry_run else 540.0
    if args.bench_timeout is None:
        args.bench_timeout = 600.0 if args.dry_run else 210.0
    if args.work is None:
        args.work = Path(os.environ.get("TMPDIR", "/tmp")) / ("scse_gpu_study_dry" if args.dry_run else "scse_gpu_study")
    unknown = set(filter(None, args.skip.split(","))) - {"bench", "study"}
    if unknown:
        parser.error(f"--skip {args.skip!r}: expected some of bench,study")
    if args.data is not None and not any(args.data.glob("image_*.nii.gz")):
        parser.error(f"--data {args.data}: no image_<id>.nii.gz files there")
    return args


class Log:
    """Lines to the console and to OUT/gpu_study.log, each part's prefixed with its name."""

    def __init__(self, path: Path):
        self.stream = path.open("a", buffering=1)
        self.lock = threading.Lock()

    def line(self, text: str, part: str = "gpu_study") -> None:
        with self.lock:
            stamped = f"[{part}] {text.rstrip()}"
            print(stamped, flush=True)
            self.stream.write(stamped + "\n")


def run_part(name: str, command: list[str], *, timeout: float, log: Log, env: dict[str, str],
             grace: float = STOP_GRACE_S, stop_when=None) -> dict[str, Any]:
    """Runs one part to its end, or to `timeout` seconds or until `stop_when()` (polled twice a
    second) says why it should stop; then SIGTERM, and SIGKILL after `grace` seconds.

    Returns its status ("ok", "failed", "stopped at its time limit", "stopped: <why>",
    "killed"), exit status, seconds and command.
    """
    log.line("$ " + " ".join(command), name)
    start = time.monotonic()
    process = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        errors="replace",
    )

    def forward() -> None:
        for line in process.stdout:
            log.line(line, name)

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    status = None
    while process.poll() is None and status is None:
        try:
            process.wait(timeout=min(0.5, max(start + timeout - time.monotonic(), 0.01)))
        except subprocess.TimeoutExpired:
            why = stop_when() if stop_when else None
            if why:
                status = f"stopped: {why}"
            elif time.monotonic() - start >= timeout:
                status = "stopped at its time limit"
    if status is not None:
        log.line(f"{status}: SIGTERM", name)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.line(f"still running {grace:.0f} s after SIGTERM: SIGKILL", name)
            process.kill()
            process.wait()
            status = "killed"
    reader.join(timeout=10)
    seconds = time.monotonic() - start
    if status is None:
        status = "ok" if process.returncode == 0 else "failed"
    log.line(f"{status} (exit status {process.returncode}) after {seconds:.1f} s", name)
    return {"status": status, "returncode": process.returncode, "seconds": seconds, "command": " ".join(command)}


def bench_command(args: argparse.Namespace, dtype: str, json_path: Path) -> list[str]:
    command = [args.python, str(BENCH), "--dtype", dtype, "--compare-torch", "--torch-modes", "eager,compile",
               "--json", str(json_path)]
    if args.dry_run:
        return command + ["--quick", "--size", "32", "--batch", "4", "--features", "4", "--steps", "1",
                          "--volume-slices", "4", "--input-batches", "2", "--torch-rounds", "2",
                          "--torch-compile-backend", "eager", "--torch-threads", "1"]
    # Steps take milliseconds on a GPU: more of them give steadier medians at no real cost. A
    # PyTorch mode that has not answered by 60% of the part's time is dropped, so that the
    # project's figures are still written before the part's own limit.
    return command + ["--device", "--steps", "20", "--warmup", "3", "--torch-rounds", "3",
                      "--torch-timeout", str(int(0.6 * args.bench_timeout))]


def study_dir(args: argparse.Namespace) -> Path:
    if args.dry_run:
        return args.work / "study_dry"
    return args.work / f"study_{args.study_size}px_{args.study_epochs}ep_{args.study_folds}folds"


def study_overrides(args: argparse.Namespace) -> list[str]:
    data_root = str(args.data.resolve()) if args.data else ""
    # An epoch is one pass over the slices here: the CPU recipe's fixed-length epochs are there
    # to fit a CPU's time limit.
    overrides = [f"data.root={data_root}", f"data.cache_dir={args.work / 'data_cache'}", "train.steps_per_epoch=0"]
    if args.dry_run:
        overrides += ["data.image_size=32", "train.num_epochs=1", "model.features=4", "train.batch_size=4",
                      "eval.batch_size=4", "eval.num_overlays=1"]
        # Four patients: two tested and two trained on (the recipe validates on none), 4 slices each.
        overrides += ["data.max_patients=4"] if args.data else [
            "data.synthetic_patients=4", "data.synthetic_size=32", "data.synthetic_slices=4"]
    else:
        overrides += [f"data.image_size={args.study_size}", f"train.num_epochs={args.study_epochs}"]
    return [f"--config.{override}" for override in overrides] + args.study_overrides


def study_command(args: argparse.Namespace, *, report_only: bool = False) -> list[str]:
    command = [args.python, "-m", "scse_jax.experiment"]
    for config in STUDY_CONFIGS:
        command += ["--config", config]
    command += ["--out", str(study_dir(args)), "--folds", str(2 if args.dry_run else args.study_folds),
                "--seeds", "0" if args.dry_run else args.study_seeds]
    return command + study_overrides(args) + ["--report-only"] * report_only


def part_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    if args.dry_run:
        # The CPU even where a GPU is present, compiling each tiny program once per checkout.
        # Not jax_disable_most_optimizations: it compiles faster, but the real MR data then
        # gave a NaN gradient at step 2 (32 px, width 4), which the optimised programs do not.
        env.update(
            JAX_PLATFORMS="cpu",
            JAX_COMPILATION_CACHE_DIR=str(PROJECT_ROOT / ".cache" / "gpu_study_dry" / "xla"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        )
    return env


def gpu_description() -> dict[str, Any]:
    """nvidia-smi's name, driver and memory of each GPU, where nvidia-smi exists."""
    if shutil.which("nvidia-smi") is None:
        return {"nvidia_smi": "not found"}
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    completed = subprocess.run(query, capture_output=True, text=True, timeout=60)
    return {"nvidia_smi": completed.stdout.strip() or completed.stderr.strip()}


# --------------------------------------------------------------------------- summaries


def speed_rows(bench: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (implementation, dtype): images/s and what bench.py says beside them.

    The project's images/s are those of the rounds alternating with PyTorch where PyTorch ran
    (the same conditions as its figures), else bench.py's own.
    """
    rows = []
    for dtype, results in bench.items():
        torch_result = results.get("torch_reference", {})
        alternating = torch_result.get("project")
        rows.append({
            "name": f"scse_jax {dtype}",
            "train_images_per_s": (alternating or results)["train_images_per_s"],
            "infer_images_per_s": (alternating or results)["infer_images_per_s"],
            "figures_from": "rounds alternating with PyTorch" if alternating else "bench.py",
            "train_fraction_of_peak": results.get("train_fraction_of_peak"),
            "infer_fraction_of_peak": results.get("infer_fraction_of_peak"),
            "peak_source": results.get("peak_source"),
            "compile_s": results.get("compile_s"),
            "infer_compile_s": results.get("infer_compile_s"),
            "input_wait_fraction": results.get("input_wait_fraction"),
            "input_wait_fraction_after_first_batch": results.get("input_wait_fraction_after_first_batch"),
            "input_overhead_fraction": results.get("input_overhead_fraction"),
            "device_peak_memory_mb": results.get("device_peak_memory_mb"),
        })
        for mode, figures in torch_result.get("modes", {}).items():
            rows.append({
                "name": f"PyTorch {mode} {dtype}",
                "train_images_per_s": figures["train_images_per_s"],
                "infer_images_per_s": figures["infer_images_per_s"],
                "project_train_speedup": figures["project_train_speedup"],
                "project_infer_speedup": figures["project_infer_speedup"],
                "first_calls_s": torch_result["setup_s"][mode],
            })
    return rows


def plot_speed(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train and inference images/s, one bar per implementation and dtype."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.8))
    for axes, key, label in zip(figure.subplots(1, 2), ("train_images_per_s", "infer_images_per_s"),
                                ("train", "inference")):
        names = [row["name"] for row in rows]
        values = [row[key] for row in rows]
        bars = axes.barh(range(len(rows)), values, color=[f"C{i % 3}" for i in range(len(rows))])
        axes.set_yticks(range(len(rows)), names, fontsize=8)
        axes.invert_yaxis()
        axes.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        axes.set_xlabel(f"{label} images per second")
        axes.grid(True, axis="x", alpha=0.3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    from scse_jax import plots

    plots.save_figure(figure, path, dpi=120)


def study_summary(folder: Path, folds: int, seeds: list[int]) -> dict[str, Any]:
    """Which runs finished, and each model's mean Dice over organs and held-out patients, over
    every finished fold and over the folds that every config finished (the paired reading)."""
    summary: dict[str, Any] = {"runs_planned": len(STUDY_CONFIGS) * folds * len(seeds)}
    names = [Path(config).stem for config in STUDY_CONFIGS]
    finished = sorted(
        f"{name}/seed{seed}/fold{fold}"
        for name in names for seed in seeds for fold in range(folds)
        if (folder / name / f"seed{seed}" / f"fold{fold}" / "test_scores.csv").exists()
    )
    summary["runs_finished"] = finished
    by_all = [
        (seed, fold) for seed in seeds for fold in range(folds)
        if all(f"{name}/seed{seed}/fold{fold}" in finished for name in names)
    ]
    summary["folds_finished_by_all"] = [f"seed{seed}/fold{fold}" for seed, fold in by_all]
    results = folder / "results.csv"
    if not results.exists():
        return summary
    with results.open() as stream:
        rows = [row for row in csv.DictReader(stream) if row["postprocess"] == "largest_component"]

    def mean_dice(rows_of_model) -> float | None:
        per_patient: dict[tuple, list[float]] = {}
        for row in rows_of_model:
            per_patient.setdefault((row["patient"], row["seed"]), []).append(float(row["dice"]))
        return statistics.fmean(statistics.fmean(v) for v in per_patient.values()) if per_patient else None

    paired = {(str(seed), str(fold)) for seed, fold in by_all}
    summary["mean_dice_largest_component"] = {
        name: {
            "all_finished_folds": mean_dice([r for r in rows if r["model"] == name]),
            "folds_finished_by_all": mean_dice(
                [r for r in rows if r["model"] == name and (r["seed"], r["fold"]) in paired]),
            "patients": len({r["patient"] for r in rows if r["model"] == name}),
        }
        for name in names
    }
    return summary


# --------------------------------------------------------------------------- the study


class Study:
    """Runs the parts and keeps OUT/gpu_study.json up to date."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        args.out.mkdir(parents=True, exist_ok=True)
        args.work.mkdir(parents=True, exist_ok=True)
        self.log = Log(args.out / "gpu_study.log")
        self.env = part_env(args)
        self.bench: dict[str, dict[str, Any]] = {}
        self.summary: dict[str, Any] = {
            "command": " ".join(["benchmarks/gpu_study.sh", *sys.argv[1:]]),
            "dry_run": args.dry_run,
            "budget_s": args.budget,
            "machine": {**gpu_description(), "python": args.python},
            "settings": {
                "bench": "batch 20, 256 px, features 16, scSE; bench.py's defaults" if not args.dry_run
                else "batch 4, 32 px, features 4, scSE, --quick, on the CPU",
                "study": {
                    "configs": list(STUDY_CONFIGS), "folds": 2 if args.dry_run else args.study_folds,
                    "seeds": "0" if args.dry_run else args.study_seeds, "overrides": study_overrides(args),
                    "data": str(args.data) if args.data else "built-in synthetic phantoms",
                },
            },
            "parts": {},
        }

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def write_summary(self) -> None:
        self.summary["elapsed_s"] = time.monotonic() - self.start
        files.write_text(self.args.out / "gpu_study.json", json.dumps(self.summary, indent=2, default=str) + "\n")

    def record(self, name: str, outcome: dict[str, Any]) -> None:
        self.summary["parts"][name] = outcome
        self.write_summary()

    def run_bench(self, dtype: str) -> None:
        name = f"bench_{dtype}"
        # What the study needs is kept back from each bench run.
        timeout = min(self.args.bench_timeout, self.remaining() - MIN_STUDY_S - REPORT_RESERVE_S)
        if timeout < 30:
            self.record(name, {"status": "skipped: no time left in the budget"})
            return
        json_path = self.args.out / f"{name}.json"
        outcome = run_part(name, bench_command(self.args, dtype, json_path), timeout=timeout, log=self.log,
                           env=self.env)
        if outcome["status"] == "ok" and json_path.exists():
            self.bench[dtype] = json.loads(json_path.read_text())
        self.record(name, outcome)

    def run_study(self) -> None:
        folder = study_dir(self.args)
        if self.args.dry_run:
            shutil.rmtree(folder, ignore_errors=True)  # a real study resumes; a dry run starts afresh
        folder.mkdir(parents=True, exist_ok=True)
        seeds = [0] if self.args.dry_run else [int(s) for s in self.args.study_seeds.split(",") if s]
        folds = 2 if self.args.dry_run else self.args.study_folds
        timeout = self.remaining() - REPORT_RESERVE_S

        def first_fold_done() -> str | None:
            return "dry run, first fold done" if study_summary(folder, folds, seeds)["folds_finished_by_all"] else None

        # The dry run stops the study as a spent budget would, once the first fold is done, so
        # that the stop and the partial report are exercised too (and cost no GPU minute).
        stop_when = first_fold_done if self.args.dry_run else None
        if timeout < MIN_STUDY_S:
            self.record("study", {"status": f"skipped: {timeout:.0f} s left of the budget, under {MIN_STUDY_S} s"})
        else:
            self.record("study", run_part("study", study_command(self.args), timeout=timeout, log=self.log,
                                          env=self.env, stop_when=stop_when))
        summary = study_summary(folder, folds, seeds)
        if summary["runs_finished"]:
            # Also after a complete study: the same tables, written by the same code either way.
            self.record("study_report", run_part(
                "study_report", study_command(self.args, report_only=True),
                timeout=max(self.remaining(), 60), log=self.log, env=self.env))
            summary = study_summary(folder, folds, seeds)
        for source, target in (("results.md", "study_results.md"), ("results.csv", "study_results.csv"),
                               ("loss_curves.png", "study_loss_curves.png")):
            if (folder / source).exists():
                shutil.copyfile(folder / source, self.args.out / target)
        self.summary["study"] = summary
        self.write_summary()

    def finish(self) -> None:
        rows = speed_rows(self.bench)
        self.summary["speed"] = rows
        if rows:
            machine = next(iter(self.bench.values()))["machine"]
            where = machine["device_kind"] if machine["platform"] != "cpu" else f"CPU ({machine['cpu_model']})"
            plot_speed(rows, self.args.out / "speed.png",
                       f"scse_jax U-Net + scSE vs the PyTorch reference on {where}" + " (dry run)" * self.args.dry_run)
        self.summary["outputs"] = sorted(path.name for path in self.args.out.iterdir() if path.is_file())
        self.write_summary()

    def failed_parts(self) -> list[str]:
        """Parts that did not end as planned; a study cut by the budget is reported, not failed."""
        return [
            name for name, part in self.summary["parts"].items()
            if part["status"] != "ok" and not (name == "study" and part["status"].startswith("stopped"))
        ]

    def guarded(self, name: str, step, *arguments) -> None:
        """Runs one step of this driver; an error in it is recorded, and the next step still runs."""
        try:
            step(*arguments)
        except Exception as error:  # noqa: BLE001 - a GPU minute is not lost to one bad step
            self.log.line(f"{name}: {type(error).__name__}: {error}")
            self.record(name, {"status": f"driver error: {type(error).__name__}: {error}"})

    def run(self) -> int:
        skip = set(filter(None, self.args.skip.split(",")))
        self.log.line(f"budget {self.args.budget:.0f} s; work folder {self.args.work}; dry run: {self.args.dry_run}")
        if "bench" not in skip:
            for dtype in DTYPES:
                self.guarded(f"bench_{dtype}", self.run_bench, dtype)
        if "study" not in skip:
            self.guarded("study", self.run_study)
        self.guarded("summary", self.finish)
        failed = self.failed_parts()
        self.log.line(f"done in {time.monotonic() - self.start:.0f} s; "
                      + (f"parts not ok: {', '.join(failed)}" if failed else "every part ok")
                      + f"; summary in {self.args.out / 'gpu_study.json'}")
        return 1 if failed else 0


def main(argv=None) -> int:
    return Study(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
