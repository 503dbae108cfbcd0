"""Scores segmentations the way the CHAOS challenge does, and writes result tables.

Command line, scoring one PNG-series segmentation against its PNG ground truth::

    python -m scse_jax.evaluate --ground DIR --seg DIR --dicom DIR [--json]

or a trained checkpoint on its run's patient split (per patient and organ; CSV and markdown)::

    python -m scse_jax.evaluate --checkpoint WORKDIR [--split test|val] [--which best|latest] [--csv OUT.csv]

As in the challenge's own evaluation (github.com/emrekavur/CHAOS-evaluation): the PNGs of
each folder and the ``*.dcm`` files are taken in sorted file-name order and must pair one to
one; the DICOM series supplies the geometry that puts voxels in millimetres. The task follows
the series' DICOM Modality: CT scores the liver (any nonzero gray value), MR scores four organs
from the CHAOS gray values (liver 55-70, right kidney 110-135, left kidney 175-200, spleen
240-255; any other nonzero value is an error, see ``scse_jax.data.labels``).

Output: one line per organ, or with ``--json`` one JSON object: for CT
``{"dice", "jaccard", "ravd", "assd", "mssd"}``, for MR one such object per organ name.
Infinite values (empty masks, see ``scse_jax.metrics``) are written as JSON ``null``.
Bad input prints one ``error: ...`` line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scse_jax import files, metrics, tables
from scse_jax.data import dicom
from scse_jax.data.labels import read_ground
from scse_jax.data.types import CLASS_NAMES
from scse_jax.errors import ConfigError, DataError, ScseError
from scse_jax.postprocess import add_largest_component_flag, postprocessed

ROW_FIELDS = ("patient", "organ") + metrics.METRIC_NAMES + ("volume_ratio",) + metrics.FALSE_POSITIVE_SITES
_TABLE_HEADERS = ("patient", "organ", "Dice", "Jaccard", "RAVD (%)", "ASSD (mm)", "MSSD (mm)")


def sorted_files(folder: Path | str, suffix: str) -> list[Path]:
    """The visible files of `folder` ending in `suffix` (any case), in sorted name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such directory")
    files = sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() == suffix and not path.name.startswith(".") and path.is_file()
    )
    if not files:
        raise DataError(f"{folder}: no {suffix} files")
    return files


def task_class_ids(modality: str) -> tuple[int, ...]:
    """The class ids scored for a modality: the liver for CT, four organs for MR."""
    return (1,) if modality == "CT" else tuple(range(1, len(CLASS_NAMES)))


def evaluate_png_series(
    ground_dir: Path | str, seg_dir: Path | str, dicom_dir: Path | str
) -> tuple[str, dict[str, dict[str, float]]]:
    """Scores a PNG-series segmentation against PNG ground truth on a DICOM series' geometry.

    Returns:
      (modality, {organ name: {"dice", "jaccard", "ravd", "assd", "mssd"}}).
    """
    ground_files = sorted_files(ground_dir, ".png")
    seg_files = sorted_files(seg_dir, ".png")
    dicom_files = sorted_files(dicom_dir, ".dcm")
    counts = {"ground truth": (len(ground_files), ground_dir), "segmentation": (len(seg_files), seg_dir)}
    for what, (count, folder) in counts.items():
        if count != len(dicom_files):
            raise DataError(
                f"{folder}: {count} {what} PNGs but {len(dicom_files)} DICOM files in {dicom_dir}"
            )
    modality = dicom.read_modality(dicom_files[0])
    voxels, geometry = dicom.read_series(dicom_files)
    dicom_shape = voxels.shape[1:]
    ground = read_ground(ground_files, modality)
    seg = read_ground(seg_files, modality)
    for labels, folder in ((ground, ground_dir), (seg, seg_dir)):
        if labels.shape[1:] != dicom_shape:
            raise DataError(
                f"{folder}: PNG size {labels.shape[2]} x {labels.shape[1]} differs from the DICOM "
                f"size {dicom_shape[1]} x {dicom_shape[0]} in {dicom_dir}"
            )
    scores = metrics.score_volume(seg, ground, geometry, class_ids=task_class_ids(modality))
    return modality, {CLASS_NAMES[class_id]: values for class_id, values in scores.items()}


def results_table(rows: Sequence[Mapping]) -> str:
    """A markdown table of result rows (patient, organ, the five metrics to three decimals)."""
    return tables.render(
        _TABLE_HEADERS,
        ([row["patient"], row["organ"]] + [tables.format_value(row[name]) for name in metrics.METRIC_NAMES] for row in rows),
    )


def write_csv(rows: Sequence[Mapping], path: Path | str) -> None:
    """Writes result rows as CSV (columns ROW_FIELDS), atomically: all of it or nothing."""
    tables.write_csv(rows, path, ROW_FIELDS)


def _json_ready(value):
    if isinstance(value, Mapping):
        return {key: _json_ready(item) for key, item in value.items()}
    return value if math.isfinite(value) else None


def _summary_line(values: Mapping[str, float]) -> str:
    return " ".join(f"{name.upper()}={tables.format_value(values[name])}" for name in metrics.METRIC_NAMES)


def score_prediction(prediction: np.ndarray, case, class_names: Sequence[str]) -> list[dict]:
    """One row per organ of a prepared case's native-grid prediction: patient, organ, the CHAOS
    metrics, the predicted / true volume and where the false positives are."""
    rows = []
    for class_id in range(1, len(class_names)):
        scores = metrics.binary_scores(prediction == class_id, case.native_labels == class_id, case.geometry)
        analysis = metrics.volume_analysis(prediction, case.native_labels, class_id)
        rows.append({"patient": case.patient, "organ": class_names[class_id], **scores, **analysis})
    return rows


def mean_dice(prediction: np.ndarray, case, class_names: Sequence[str]) -> float:
    """The mean Dice over the organs of a prepared case's native-grid prediction."""
    return float(np.mean([row["dice"] for row in score_prediction(prediction, case, class_names)]))


def score_cases(cases, predict_native, class_names: Sequence[str]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Predicts prepared cases on their native grid with ``predict_native(case)`` and scores them
    (`score_prediction`); returns the rows and the predictions by case key."""
    rows, predictions = [], {}
    for case in cases:
        labels = predict_native(case)
        predictions[case.case_key] = labels
        rows += score_prediction(labels, case, class_names)
    return rows, predictions


def summarise_rows(rows: Sequence[Mapping], class_names: Sequence[str]) -> dict[str, Any]:
    """Per-organ means of Dice, Jaccard and predicted / true volume over cases; the means of
    Dice and Jaccard over organs."""
    summary: dict[str, Any] = {"dice": {}, "jaccard": {}, "volume_ratio": {}}
    for organ in class_names[1:]:
        of_organ = tables.organ_rows(rows, organ)
        for metric in summary:
            summary[metric][organ] = float(np.mean([row[metric] for row in of_organ])) if of_organ else math.nan
    summary["dice_mean"] = float(np.nanmean(list(summary["dice"].values())))
    summary["jaccard_mean"] = float(np.nanmean(list(summary["jaccard"].values())))
    return summary


def dice_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table of per-organ Dice and Jaccard and their means (`summarise_rows`)."""
    cells = [[organ, tables.format_value(dice), tables.format_value(summary["jaccard"][organ])]
             for organ, dice in summary["dice"].items()]
    cells.append(["mean", tables.format_value(summary["dice_mean"]), tables.format_value(summary["jaccard_mean"])])
    return tables.render(("organ", "dice", "jaccard"), cells, markdown=False)


def score_checkpoint(
    path: Path | str, *, split: str = "test", which: str | None = None, largest_component: bool | None = None
):
    """Scores a run's checkpoint (``which``: best, latest, a step, or None: the run's
    eval.checkpoint) on the patients of one split of its own config.

    Returns (rows, predictions by case key, the prepared cases, the segmenter).
    """
    segmenter, cases = _checkpoint_and_split(path, split, which, largest_component)
    rows, predictions = score_cases(cases, segmenter.segment_case, segmenter.class_names)
    return rows, predictions, cases, segmenter


def score_checkpoint_postprocessings(
    path: Path | str, choices: Mapping[str, bool], *, split: str = "test", which: str | None = None
) -> tuple[dict[str, list[dict]], int]:
    """Scores a run's checkpoint once per post-processing choice ({name: largest_component}),
    from one restore and one prediction per case: each choice post-processes the same
    native-grid prediction. Returns the rows per choice and the checkpoint's step."""
    segmenter, cases = _checkpoint_and_split(path, split, which, largest_component=False)
    num_classes = len(segmenter.class_names)
    rows: dict[str, list[dict]] = {name: [] for name in choices}
    for case in cases:
        native = segmenter.segment_case(case)
        for name, largest_component in choices.items():
            labels = postprocessed(native, num_classes=num_classes, largest_component=largest_component)
            rows[name] += score_prediction(labels, case, segmenter.class_names)
    return rows, segmenter.step


def _checkpoint_and_split(path: Path | str, split: str, which: str | None, largest_component: bool | None):
    """(the segmenter of a run's checkpoint, the prepared cases of one split of its config);
    compiled predictions are kept in the compile cache beside those cases."""
    from scse_jax import compilation
    from scse_jax.data.run_data import prepare_split
    from scse_jax.inference import Segmenter

    if split not in ("test", "val"):
        raise ConfigError(f"split must be 'test' or 'val', got {split!r}")
    segmenter = Segmenter.from_checkpoint(path, which=which, largest_component=largest_component)
    local_config = config_on_this_machine(segmenter.config)
    compilation.use_compilation_cache(local_config.data)
    cases = prepare_split(local_config, split)
    if not cases:
        raise DataError(f"the run in {path} has no {split} patients (data.num_folds=1 has no test set)")
    return segmenter, cases


def config_on_this_machine(config):
    """The run's config, reading its cache folder only where it exists here: a checkpoint
    from elsewhere names a cache_dir of another machine, which must not be created here (the
    prepared cases, and the synthetic data, go to this machine's default cache instead)."""
    import ml_collections

    cache_dir = config.data.get("cache_dir")
    if not cache_dir or Path(cache_dir).expanduser().is_dir():
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.cache_dir = ""
    return config


def _score_checkpoint_command(args) -> int:
    if args.csv:
        files.check_file_target(args.csv, "--csv")  # before the scoring, not after it
    rows, _, _, segmenter = score_checkpoint(
        args.checkpoint, split=args.split, which=args.which, largest_component=args.largest_component
    )
    print(f"{args.split} patients, checkpoint {segmenter.chosen} of {args.checkpoint}:")
    print(results_table(rows))
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scse_jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ground", type=Path, help="folder of ground-truth PNGs")
    parser.add_argument("--seg", type=Path, help="folder of segmentation PNGs")
    parser.add_argument("--dicom", type=Path, help="folder of the series' DICOM files")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--checkpoint", type=Path, help="a run's workdir: score its model on --split")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument(
        "--which", help="best, latest or a step number (default: the run's eval.checkpoint, best unless it says latest)"
    )
    parser.add_argument("--csv", type=Path, help="with --checkpoint: also write the rows as CSV")
    add_largest_component_flag(parser)
    args = parser.parse_args(argv)
    if args.checkpoint is None and None in (args.ground, args.seg, args.dicom):
        parser.error("give --ground, --seg and --dicom, or --checkpoint")
    try:
        if args.checkpoint is not None:
            return _score_checkpoint_command(args)
        modality, organ_scores = evaluate_png_series(args.ground, args.seg, args.dicom)
    except ScseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        result = organ_scores["liver"] if modality == "CT" else organ_scores
        print(json.dumps(_json_ready(result), indent=2))
    elif modality == "CT":
        print(_summary_line(organ_scores["liver"]))
    else:
        for organ, values in organ_scores.items():
            print(f"{organ}: {_summary_line(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
