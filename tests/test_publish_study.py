"""docs/results/recipe/publish_study.py: a study's report and run records copied under one name,
the hand-written header kept, checkpoints left behind."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "results" / "recipe" / "publish_study.py"
spec = importlib.util.spec_from_file_location("publish_study", SCRIPT)
publish_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(publish_study)


def fake_study(root: Path, report: str) -> Path:
    root.mkdir(parents=True)
    (root / "results.md").write_text(report)
    (root / "results.csv").write_text("patient,dice\n1,0.9\n")
    (root / "loss_curves.png").write_bytes(b"png")
    (root / "overlays").mkdir()
    (root / "overlays" / "fold0_MR_1.png").write_bytes(b"png")
    finished = root / "mr_scse_cpu" / "seed0" / "fold0"
    (finished / "checkpoints" / "700").mkdir(parents=True)
    for record in publish_study.RUN_RECORDS:
        (finished / record).write_text(record)
    unfinished = root / "mr_scse_cpu" / "seed0" / "fold1"
    unfinished.mkdir(parents=True)
    (unfinished / "metrics.jsonl").write_text("{}\n")  # no test_scores.csv: not finished, not published
    return root


def test_publish_copies_the_report_records_and_pictures_and_no_checkpoint(tmp_path):
    study = fake_study(tmp_path / "study", "| model | Dice |\n")
    results = tmp_path / "results"
    results.mkdir()
    publish_study.publish(study, "trial", results)
    page = (results / "trial.md").read_text()
    assert page.startswith("# TITLE") and page.endswith("| model | Dice |\n")
    assert (results / "trial.csv").read_text() == "patient,dice\n1,0.9\n"
    assert (results / "trial_loss_curves.png").is_file() and (results / "trial_overlays" / "fold0_MR_1.png").is_file()
    run = results / "trial_runs" / "mr_scse_cpu" / "seed0"
    assert sorted(p.name for p in (run / "fold0").iterdir()) == sorted(publish_study.RUN_RECORDS)
    assert not (run / "fold1").exists()


def test_a_second_publication_keeps_the_header_and_replaces_the_report(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    publish_study.publish(fake_study(tmp_path / "a", "old table\n"), "trial", results)
    page = results / "trial.md"
    page.write_text(page.read_text().replace("# TITLE", "# My study (partial)"))
    publish_study.publish(fake_study(tmp_path / "b", "new table\n"), "trial", results)
    text = page.read_text()
    assert text.startswith("# My study (partial)") and text.endswith("new table\n") and "old table" not in text
    assert text.count(publish_study.REPORT_START) == 1


def test_a_study_without_its_report_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--report-only"):
        publish_study.publish(tmp_path, "trial", tmp_path)


def test_replacements_rewrite_the_reports_paths(tmp_path):
    study = fake_study(tmp_path / "study", f"Reproduce: `--out {tmp_path}/study --config.data.root=/data/mr`\n")
    results = tmp_path / "results"
    results.mkdir()
    publish_study.publish(study, "trial", results, replace={f"{tmp_path}/study": "runs/trial", "/data": "../shared/data"})
    assert (results / "trial.md").read_text().endswith("`--out runs/trial --config.data.root=../shared/data/mr`\n")
