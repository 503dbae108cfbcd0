"""Copies a study's report and its runs' records into docs/results/, under one name.

    python docs/results/recipe/publish_study.py STUDY_DIR NAME

STUDY_DIR is an experiment folder (``python -m scse_jax.experiment --out STUDY_DIR``) whose
``results.md`` is up to date (``--report-only`` rewrites it from the finished runs). NAME is the
published stem: ``docs/results/NAME.md`` receives results.md below a header written by hand
(kept from an earlier publication, or a placeholder to fill in), and ``NAME.csv``,
``NAME_loss_curves.png``, ``NAME_overlays/`` and ``NAME_runs/`` receive the table, the curves, the
overlays and every finished run's ``test_scores.csv``, ``metrics.jsonl`` and ``run_time.json``:
what ``--report-only`` needs to rewrite the report. Nothing else of a run (its checkpoints) is copied.
``--replace OLD=NEW`` (repeatable) rewrites text of the report, such as this machine's paths in
its command (``--replace /root/scse_runs/study=runs/study``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1]
RUN_RECORDS = ("test_scores.csv", "metrics.jsonl", "run_time.json")
REPORT_START = "<!-- the report of `experiment --report-only` follows -->"


def publish(study: Path, name: str, results: Path = RESULTS, replace: dict[str, str] | None = None) -> list[Path]:
    """Writes the publication, ``replace``'s texts replaced in the report; returns the paths
    written. Raises SystemExit naming what is missing."""
    report = study / "results.md"
    if not report.is_file():
        raise SystemExit(f"{report} is missing: run the experiment with --report-only --out {study} first")
    written = []
    page = results / f"{name}.md"
    header = "# TITLE\n\nWhat was run, from which commit, and what it shows.\n"
    if page.exists() and REPORT_START in page.read_text():
        header = page.read_text().split(REPORT_START)[0].rstrip("\n") + "\n"
    text = report.read_text()
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    page.write_text(f"{header}\n{REPORT_START}\n\n{text}")
    written.append(page)
    for source, target in (("results.csv", f"{name}.csv"), ("loss_curves.png", f"{name}_loss_curves.png")):
        if (study / source).is_file():
            shutil.copyfile(study / source, results / target)
            written.append(results / target)
    if (study / "overlays").is_dir():
        shutil.copytree(study / "overlays", results / f"{name}_overlays", dirs_exist_ok=True)
        written.append(results / f"{name}_overlays")
    for scores in sorted(study.glob("*/seed*/fold*/test_scores.csv")):
        run = scores.parent
        target = results / f"{name}_runs" / run.relative_to(study)
        target.mkdir(parents=True, exist_ok=True)
        for record in RUN_RECORDS:
            if (run / record).is_file():
                shutil.copyfile(run / record, target / record)
                written.append(target / record)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="the experiment's --out folder")
    parser.add_argument("name", help="the stem of the published files in docs/results/")
    parser.add_argument("--replace", action="append", default=[], metavar="OLD=NEW", help="text to rewrite in the report")
    args = parser.parse_args(argv)
    if not all("=" in pair for pair in args.replace):
        parser.error("--replace takes OLD=NEW")
    written = publish(args.study, args.name, replace=dict(pair.split("=", 1) for pair in args.replace))
    print(f"{len(written)} files and folders written; the page is {written[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
