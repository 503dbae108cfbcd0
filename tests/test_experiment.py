"""The study runner: seeds, stopped runs left unscored, post-processing on and off, reports."""

import csv
import json
import shutil

import pytest

from scse_jax import experiment, train
from scse_jax.errors import ConfigError, RunStopped
from tests._launch import REPO

CONFIGS = ["configs/mr_unet.py", "configs/mr_scse.py"]


@pytest.fixture
def study_settings(tiny_data):
    root, cache = tiny_data
    return [
        f"--config.data.root={root}", f"--config.data.cache_dir={cache}", "--config.data.image_size=32",
        "--config.model.features=4", "--config.train.batch_size=8", "--config.eval.batch_size=8",
    ]


@pytest.fixture
def fake_training(tiny_trained_run, monkeypatch):
    """Training replaced by a copy of a finished tiny run; records which workdirs it 'trained'."""
    trained = []

    def train_and_evaluate(config, workdir):
        trained.append((workdir.relative_to(workdir.parents[2]).as_posix(), config.train.seed, config.data.fold))
        shutil.copytree(tiny_trained_run[0], workdir, dirs_exist_ok=True)
        return {}

    monkeypatch.setattr(train, "train_and_evaluate", train_and_evaluate)
    return trained


def test_a_stopped_run_is_not_scored_and_the_next_call_resumes_it(
    tmp_path, study_settings, fake_training, tiny_trained_run, monkeypatch
):
    real_training = train.train_and_evaluate

    def stopped(config, workdir):
        shutil.copytree(tiny_trained_run[0] / "checkpoints", workdir / "checkpoints")  # the steps it saved
        raise RunStopped("SIGTERM received: saved step 3")

    monkeypatch.setattr(train, "train_and_evaluate", stopped)
    code = experiment.main(["--config", CONFIGS[0], "--out", str(tmp_path), "--folds", "4", *study_settings])
    assert code == 1
    assert not list(tmp_path.rglob("test_scores.csv")) and not (tmp_path / "results.md").exists()

    monkeypatch.setattr(train, "train_and_evaluate", real_training)  # the fake that finishes
    workdir = tmp_path / "mr_unet" / "seed0" / "fold0"
    rows = experiment.run_fold(experiment.load_study_configs(CONFIGS[:1], study_settings, 4)["mr_unet"], workdir)
    assert fake_training == [("mr_unet/seed0/fold0", 0, 0)]
    assert json.loads((workdir / experiment.RUN_TIME).read_text())["started_fresh"] is False  # resumed: not timed
    assert {row["postprocess"] for row in rows} == set(experiment.POSTPROCESSING)
    assert all("volume_ratio" in row for row in rows)


def test_run_fold_scores_both_postprocessings_from_one_restore_and_one_prediction_per_patient(
    tmp_path, study_settings, fake_training, monkeypatch
):
    from scse_jax import evaluate
    from scse_jax.inference import Segmenter
    from scse_jax.prediction import Predictor

    restores, predictions = [], []
    from_checkpoint, predict = Segmenter.from_checkpoint.__func__, Predictor.predict
    monkeypatch.setattr(Segmenter, "from_checkpoint", classmethod(
        lambda cls, *args, **kwargs: restores.append(args) or from_checkpoint(cls, *args, **kwargs)
    ))
    monkeypatch.setattr(Predictor, "predict", lambda self, *args, **kwargs: predictions.append(1) or predict(
        self, *args, **kwargs
    ))
    workdir = tmp_path / "mr_unet" / "seed0" / "fold0"
    rows = experiment.run_fold(experiment.load_study_configs(CONFIGS[:1], study_settings, 4)["mr_unet"], workdir)
    patients = {row["patient"] for row in rows}
    assert len(restores) == 1 and len(predictions) == len(patients)

    for name, largest_component in experiment.POSTPROCESSING.items():  # as scored one choice at a time
        expected, _, _, _ = evaluate.score_checkpoint(workdir, largest_component=largest_component)
        scored = [
            {k: v for k, v in row.items() if k not in ("postprocess", "checkpoint", "step")}
            for row in rows if row["postprocess"] == name
        ]  # fmt: skip
        assert scored == expected
    assert {(row["checkpoint"], row["step"]) for row in rows} == {("best", restored_step(workdir, "best"))}


def restored_step(workdir, which):
    from scse_jax.checkpoint import Checkpoints, checkpoint_dir

    ckpts = Checkpoints(checkpoint_dir(workdir), read_only=True)
    try:
        return ckpts.chosen_step(which)
    finally:
        ckpts.close()


def test_rescore_scores_finished_runs_of_another_checkpoint_again_and_keeps_the_earlier_scores(
    tmp_path, study_settings, fake_training, monkeypatch
):
    from scse_jax import evaluate

    experiment.run_study(CONFIGS[:1], tmp_path, folds=2, seeds=[0], overrides=study_settings)
    fake_training.clear()
    runs = [tmp_path / "mr_unet" / "seed0" / f"fold{fold}" for fold in range(2)]
    before = [(run / "test_scores.csv").read_text() for run in runs]
    assert all(",best," in text for text in before)

    latest = [*study_settings, "--config.eval.checkpoint=latest"]
    experiment.run_study(CONFIGS[:1], tmp_path, folds=2, seeds=[0], overrides=latest)  # no --rescore: read back
    assert [(run / "test_scores.csv").read_text() for run in runs] == before

    asked = []
    score = evaluate.score_checkpoint_postprocessings
    monkeypatch.setattr(evaluate, "score_checkpoint_postprocessings", lambda *a, **k: asked.append(k["which"]) or score(*a, **k))
    text = experiment.run_study(
        CONFIGS[:1], tmp_path, folds=2, seeds=[0], overrides=latest, report_only=True, rescore=True
    )
    assert fake_training == [] and asked == ["latest", "latest"]
    for run, earlier in zip(runs, before):
        assert [kept.read_text() for kept in run.glob("test_scores.replaced-*.csv")] == [earlier]
        with (run / "test_scores.csv").open() as stream:
            rows = list(csv.DictReader(stream))
        assert {(row["checkpoint"], int(row["step"])) for row in rows} == {("latest", restored_step(run, "latest"))}
    assert "Checkpoint scored: mr_unet latest." in text

    experiment.run_study(CONFIGS[:1], tmp_path, folds=2, seeds=[0], overrides=latest, report_only=True, rescore=True)
    assert asked == ["latest", "latest"]  # already of that checkpoint: not scored again
    assert all(len(list(run.glob("test_scores.replaced-*.csv"))) == 1 for run in runs)


def test_rescore_scores_the_latest_checkpoint_where_it_differs_from_the_best(
    tmp_path, study_settings, two_checkpoint_run, monkeypatch
):
    from scse_jax import evaluate

    run, best, latest = two_checkpoint_run
    workdir = tmp_path / "mr_unet" / "seed0" / "fold0"
    shutil.copytree(run, workdir)
    monkeypatch.setattr(train, "train_and_evaluate", lambda config, workdir: {})  # trained already
    config = experiment.load_study_configs(CONFIGS[:1], study_settings, 4)["mr_unet"]
    first = experiment.run_fold(config, workdir)
    config.eval.checkpoint = "latest"
    again = experiment.run_fold(config, workdir, rescore=True)

    def scores(rows):
        return [
            {k: v for k, v in row.items() if k not in ("postprocess", "checkpoint", "step")}
            for row in rows if row["postprocess"] == "none"
        ]  # fmt: skip

    assert {row["step"] for row in first} == {best} and {row["step"] for row in again} == {latest}
    by_latest, _, _, _ = evaluate.score_checkpoint(workdir, which="latest", largest_component=False)
    by_best, _, _, _ = evaluate.score_checkpoint(workdir, which="best", largest_component=False)
    assert scores(again) == by_latest and scores(first) == by_best and by_latest != by_best


def test_scores_without_a_checkpoint_column_count_as_the_best_and_runs_without_checkpoints_are_named(
    tmp_path, study_settings, fake_training
):
    experiment.run_study(CONFIGS[:1], tmp_path, folds=2, seeds=[0], overrides=study_settings)
    runs = [tmp_path / "mr_unet" / "seed0" / f"fold{fold}" for fold in range(2)]
    for run in runs:  # as written before the column existed
        with (run / "test_scores.csv").open() as stream:
            rows = [{k: v for k, v in row.items() if k not in ("checkpoint", "step")} for row in csv.DictReader(stream)]
        with (run / "test_scores.csv").open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    old = [(run / "test_scores.csv").read_text() for run in runs]
    text = experiment.run_study(CONFIGS[:1], tmp_path, folds=2, seeds=[0], overrides=study_settings, rescore=True)
    assert [(run / "test_scores.csv").read_text() for run in runs] == old  # already of the best: kept
    assert "Checkpoint scored: mr_unet best (by validation Dice)." in text

    shutil.rmtree(runs[1] / "checkpoints")  # as in run records kept without their checkpoints
    latest = [*study_settings, "--config.eval.checkpoint=latest"]
    with pytest.raises(ConfigError, match="fold1: its scores are not of the latest checkpoint .* checkpoints are not there"):
        experiment.run_study(CONFIGS[:1], tmp_path, folds=2, seeds=[0], overrides=latest, report_only=True, rescore=True)
    text = experiment.run_study(CONFIGS[:1], tmp_path, folds=2, seeds=[0], overrides=latest, report_only=True)
    assert "mr_unet MIXED, best (by validation Dice) in 1 runs and latest in 1 runs" in text


def test_study_reports_partial_then_trains_only_the_missing_seed(tmp_path, study_settings, fake_training):
    experiment.run_study(CONFIGS, tmp_path, folds=2, seeds=[0], overrides=study_settings)
    fake_training.clear()
    shutil.rmtree(tmp_path / "overlays")
    partial = experiment.run_study(CONFIGS, tmp_path, folds=2, seeds=[0, 1], overrides=study_settings, report_only=True)
    assert fake_training == []
    assert "(partial)" in partial and "4 of 8 runs not finished" in partial
    assert list((tmp_path / "overlays").glob("*.png"))  # seed 0 fold 0 is finished: drawn while partial

    text = experiment.run_study(CONFIGS, tmp_path, folds=2, seeds=[0, 1], overrides=study_settings)
    assert sorted(fake_training) == sorted(
        (f"{name}/seed1/fold{fold}", 1, fold) for name in ("mr_unet", "mr_scse") for fold in range(2)
    )
    with (tmp_path / "results.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    # Every fake run is the same copied run, testing the same patients.
    patients = {row["patient"] for row in rows}
    # 2 models x 2 seeds x 2 folds x (patients x 4 organs) x 2 post-processings
    assert len(rows) == 2 * 2 * 2 * len(patients) * 4 * 2
    assert "(partial)" not in text and "seed 0" in text and "seed 1" in text
    assert f'"pairs": {2 * len(patients)}' in text  # every (patient, seed)
    assert text.split("Minutes per run")[1].count(", 4 runs)") == 2  # both models, every run trained fresh
    assert (tmp_path / "loss_curves.png").exists() and list((tmp_path / "overlays").glob("*.png"))


def test_a_report_from_run_records_alone_matches_and_skips_the_overlays(tmp_path, study_settings, fake_training):
    full = experiment.run_study(CONFIGS, tmp_path / "study", folds=2, seeds=[0], overrides=study_settings)
    for scores in (tmp_path / "study").rglob("test_scores.csv"):  # what a run keeps besides its checkpoints
        records = tmp_path / "records" / scores.parent.relative_to(tmp_path / "study")
        records.mkdir(parents=True)
        for name in ("test_scores.csv", experiment.RUN_TIME, "metrics.jsonl"):
            shutil.copy(scores.parent / name, records / name)
    fake_training.clear()
    text = experiment.run_study(CONFIGS, tmp_path / "records", folds=2, seeds=[0], overrides=study_settings)
    assert fake_training == []  # finished runs are not trained again
    assert text.split("| model |")[1].split("Overlays")[0] == full.split("| model |")[1].split("Overlays")[0]
    assert "not drawn" in text and not (tmp_path / "records" / "overlays").exists()
    assert (tmp_path / "records" / "loss_curves.png").exists()


def test_run_minutes_counts_only_runs_trained_from_scratch(tmp_path):
    for name, train_s, fresh in (("a", 600, True), ("b", 1200, True), ("c", 30, False), ("d", 60, True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / experiment.RUN_TIME).write_text(
            f'{{"train_s": {train_s}, "score_s": 60, "started_fresh": {str(fresh).lower()}}}'
        )
    (tmp_path / "unfinished").mkdir()
    runs = [tmp_path / name for name in ("a", "b", "c", "d", "unfinished")]
    assert experiment.run_minutes(runs) == "median 11.0 (range 2.0-21.0, 3 runs)"
    assert experiment.run_minutes(runs[2:3]).startswith("not timed")


def test_paired_comparison_pairs_patients_and_seeds():
    def rows(values):
        return [
            {"patient": p, "seed": s, "organ": "liver", "dice": v} for (p, s), v in values.items()
        ]

    a = rows({("1", 0): 0.5, ("1", 1): 0.6, ("2", 0): 0.7, ("2", 1): 0.7, ("3", 0): 0.4, ("3", 1): 0.5})
    b = rows({("1", 0): 0.6, ("1", 1): 0.7, ("2", 0): 0.7, ("2", 1): 0.9, ("3", 0): 0.5, ("3", 1): 0.4})
    result = experiment.paired_comparison(a, b)
    assert result["pairs"] == 6 and result["patients"] == 3 and result["b_better"] == 4
    assert result["mean_difference"] == pytest.approx(0.4 / 6)
    assert 0 < result["wilcoxon_p"] <= 1 and 0 < result["patient_means_wilcoxon_p"] <= 1
    assert experiment.seed_means(b) == pytest.approx({0: 0.6, 1: 2.0 / 3})


def test_each_config_is_compared_with_the_one_before_it():
    def rows(shift):
        return [{"patient": p, "seed": 0, "organ": "liver", "dice": 0.5 + 0.1 * int(p) + shift} for p in "123"]

    lines = experiment.paired_comparison_lines({"unet": rows(0.0), "scse": rows(0.02), "scse_bf16": rows(0.01)})
    titles = [line for line in lines if line.startswith("Paired comparison")]
    assert titles == [
        "Paired comparison, scse minus unet (mean Dice over organs per patient and seed):",
        "Paired comparison, scse_bf16 minus scse (mean Dice over organs per patient and seed):",
    ]
    results = [json.loads(block.split("```")[1]) for block in "\n".join(lines).split("Paired comparison")[1:]]
    assert [r["mean_difference"] for r in results] == pytest.approx([0.02, -0.01])
    assert experiment.paired_comparison_lines({"unet": rows(0.0)}) == []


def test_bad_seeds_and_folds_are_one_line_errors(tmp_path, capsys):
    assert experiment.main(["--config", CONFIGS[0], "--out", str(tmp_path), "--seeds", "0,x"]) == 1
    assert "--seeds" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--folds"):
        experiment.load_study_configs(CONFIGS[:1], [], 0)


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert experiment.main(["--config", CONFIGS[0], "--out", str(tmp_path / "notes.txt")]) == 1
    assert capsys.readouterr().err == (
        f"error: --out {tmp_path / 'notes.txt'}: cannot create the study folder (File exists)\n"
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_study_splits_the_cpu_as_every_configs_batches_allow(monkeypatch, tmp_path):
    requests = []

    class Chosen(Exception):
        pass

    def set_up(requested, batch_sizes):
        requests.append((requested, batch_sizes))
        raise Chosen

    monkeypatch.setattr(experiment.cpu_layout, "set_up", set_up)
    configs = [arg for name in ("mr_unet_cpu", "mr_scse_cpu") for arg in ("--config", str(REPO / "configs" / f"{name}.py"))]
    with pytest.raises(Chosen):
        experiment.main([*configs, "--out", str(tmp_path), "--config.train.batch_size=6"])
    with pytest.raises(Chosen):
        experiment.main([*configs, "--out", str(tmp_path), "--cpu-devices", "1"])
    assert requests == [("auto", [6, 16, 6, 16]), ("1", [10, 16, 10, 16])]
