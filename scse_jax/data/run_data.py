"""From a run's data config to what training needs: prepared patients, split, class weights."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
import threading
import time
from pathlib import Path

import ml_collections
import numpy as np

from scse_jax.data import chaos, pipeline, synthetic
from scse_jax.data.preprocess import (
    PreparedCase,
    PreprocessSettings,
    iter_prepared_cases,
    prepare_cases,
    resize_labels,
)
from scse_jax.data.types import Case
from scse_jax.errors import ConfigError, DataError


@dataclasses.dataclass
class RunData:
    """The prepared data of one run, split by patient."""

    split: pipeline.Split
    class_names: tuple[str, ...]
    train: pipeline.SliceDataset
    val: list[PreparedCase]
    test: list[PreparedCase]
    class_weights: np.ndarray


def cache_root(data_config: ml_collections.ConfigDict) -> Path:
    """Where prepared cases and the built-in synthetic data are kept."""
    if data_config.cache_dir:
        return Path(data_config.cache_dir).expanduser()
    return Path(os.environ.get("SCSE_JAX_CACHE", Path.home() / ".cache" / "scse_jax"))


def resolve_data_root(data_config: ml_collections.ConfigDict) -> Path:
    """The configured data root, or the built-in synthetic CHAOS data (written once)."""
    if data_config.root:
        root = Path(data_config.root).expanduser()
        if not root.exists():
            raise ConfigError(f"config.data.root: {root} does not exist")
        return root
    name = (
        f"synthetic_chaos_p{data_config.synthetic_patients}_s{data_config.synthetic_size}"
        f"_k{data_config.synthetic_slices}"
    )
    root = cache_root(data_config) / name
    print(
        f"No data.root given: using the built-in synthetic CHAOS-format data in {root}. "
        "For real data pass --config.data.root=/path/to/CHAOS_Train_Sets/Train_Sets "
        "(or a CHAOST2 NIfTI folder).",
        flush=True,
    )
    if not root.exists():
        synthetic.write_synthetic_chaos(
            root,
            patients=data_config.synthetic_patients,
            size=data_config.synthetic_size,
            slices=data_config.synthetic_slices,
            seed=0,
        )
    return root


def select_cases(cases: list[Case], data_config: ml_collections.ConfigDict, root: Path) -> list[Case]:
    """The labelled cases of the configured modality and sequences (optionally the first N patients)."""
    sequences = tuple(data_config.sequences)
    chosen = [
        case
        for case in cases
        if case.modality == data_config.modality and case.sequence in sequences and case.label_files
    ]
    if not chosen:
        raise ConfigError(
            f"config.data: no labelled {data_config.modality} {'/'.join(sequences)} cases under {root}"
        )
    if data_config.max_patients:
        keep = list(dict.fromkeys(case.patient for case in chosen))[: data_config.max_patients]
        chosen = [case for case in chosen if case.patient in keep]
    return chosen


@dataclasses.dataclass
class RunPlan:
    """What a run will train on, found without decoding any image."""

    cases: list[Case]
    split: pipeline.Split
    class_names: tuple[str, ...]

    def cases_of(self, patients) -> list[Case]:
        wanted = set(patients)
        return [case for case in self.cases if case.patient in wanted]

    def num_train_slices(self) -> int:
        """Training examples, from file lists and NIfTI headers."""
        return sum(chaos.num_slices(case) for case in self.cases_of(self.split.train))


def plan_run_data(config: ml_collections.ConfigDict) -> RunPlan:
    """Finds the configured cases and splits them by patient."""
    data_config = config.data
    root = resolve_data_root(data_config)
    cases = select_cases(chaos.find_cases(root), data_config, root)
    for case in cases:  # every split's: a bad validation file must not wait for the first epoch's end
        chaos.check_headers(case)
    patients = list(dict.fromkeys(case.patient for case in cases))
    split = pipeline.split_patients(
        patients,
        num_folds=data_config.num_folds,
        fold=data_config.fold,
        num_val=data_config.num_val_patients,
        seed=data_config.split_seed,
    )
    return RunPlan(cases=cases, split=split, class_names=cases[0].class_names)


def check_training_labels(counts: np.ndarray, class_names: tuple[str, ...], num_maps: int) -> None:
    """Refuses training label maps without a single organ voxel (nothing to learn: the run
    would end with a meaningless Dice); warns of each organ that none of them holds."""
    if not np.any(counts[1:]):
        raise DataError(
            f"the {num_maps} training label maps hold only background, no {'/'.join(class_names[1:])} voxel: "
            "nothing to learn (empty ground truth?)"
        )
    absent = [name for name, count in zip(class_names[1:], counts[1:]) if count == 0]
    if absent:
        print(
            f"warning: no {', '.join(absent)} voxel in the {num_maps} training label maps: the network cannot "
            "learn to find it",
            file=sys.stderr,
            flush=True,
        )


def share_classes(plan: RunPlan, config: ml_collections.ConfigDict) -> int:
    """Classes whose shares of each pixel the training set holds: all with ``data.soft_labels``, else none."""
    return len(plan.class_names) if config.data.get("soft_labels", False) else 0


# The first epoch's shuffle buffer, as a fraction of the training slices: training starts once
# about this fraction of the training cases is read.
FIRST_EPOCH_BUFFER_FRACTION = 0.25


class StreamedRunData:
    """A run's data, prepared in a background thread in the order training consumes it.

    First the training label maps alone (cheap: PNGs or one NIfTI file per case), for the
    class weights; then the training cases, in an order shuffled from the run's seed, each
    appended to `train` as soon as it is ready, so that the first epoch (in
    `first_epoch_order`) trains while later cases are still being decoded; then the
    validation and test cases. Any error reaches whoever waits on the data.
    """

    def __init__(self, plan: RunPlan, config: ml_collections.ConfigDict):
        self._plan, self._config = plan, config
        in_patient_order = plan.cases_of(plan.split.train)
        shuffled = np.random.default_rng((config.train.seed, 0)).permutation(len(in_patient_order))
        self.train_cases = [in_patient_order[i] for i in shuffled]
        self._lengths = [chaos.num_slices(case) for case in self.train_cases]
        self.train = pipeline.StreamedSliceDataset(
            sum(self._lengths), config.data.image_size, context=config.data.context_slices,
            share_classes=share_classes(plan, config),
        )
        self._weights: concurrent.futures.Future = concurrent.futures.Future()
        self._result: concurrent.futures.Future = concurrent.futures.Future()
        # Started last: the reader uses every attribute set above.
        threading.Thread(target=self._prepare, name="prepare-data", daemon=True).start()

    def first_epoch_order(self) -> np.ndarray | None:
        """The rows' order in the first epoch (None: the usual full shuffle)."""
        if not self._config.data.stream_first_epoch:
            return None
        buffer = max(self._config.train.batch_size, round(FIRST_EPOCH_BUFFER_FRACTION * len(self.train)))
        return pipeline.streaming_order(self._lengths, buffer_size=buffer, seed=self._config.train.seed)

    def class_weights(self) -> np.ndarray:
        """Waits for the training label maps; their class weights (train.class_weighting)."""
        return self._weights.result()

    def result(self) -> RunData:
        """Waits for every case."""
        return self._result.result()

    def _prepare(self) -> None:
        try:
            self._run()
        except BaseException as error:  # handed to the waiting readers
            self.train.fail(error)
            for future in (self._weights, self._result):
                if not future.done():
                    future.set_exception(error)

    def _run(self) -> None:
        plan, size = self._plan, self._config.data.image_size
        num_classes = len(plan.class_names)
        start = time.perf_counter()
        counts = [
            pipeline.class_counts(resize_labels(chaos.load_labels(case), (size, size)), num_classes)
            for case in self.train_cases
        ]
        check_training_labels(np.sum(counts, axis=0), plan.class_names, len(counts))
        weighting = self._config.train.class_weighting
        weights = pipeline.weights_from_counts(np.sum(counts, axis=0), weighting)
        self._weights.set_result(weights)
        print(
            f"class weights ({weighting}) from {len(counts)} training label maps in "
            f"{time.perf_counter() - start:.2f} s: " + " ".join(f"{w:.3g}" for w in weights),
            file=sys.stderr,
            flush=True,
        )
        settings = PreprocessSettings(image_size=size)
        cache = cache_root(self._config.data) / "prepared"
        for prepared, length, count in zip(
            iter_prepared_cases(self.train_cases, settings, cache), self._lengths, counts
        ):
            if len(prepared.images) != length or not np.array_equal(
                pipeline.class_counts(prepared.labels, num_classes), count
            ):
                raise DataError(
                    f"{prepared.case_key}: its prepared slices or labels differ from what its files "
                    "promised when the run started: did the data change during the run?"
                )
            self.train.append_case(prepared)
        held_out = plan.cases_of(plan.split.val + plan.split.test)
        prepared = list(iter_prepared_cases(held_out, settings, cache))
        by_patient = lambda names: [p for p in prepared if p.patient in set(names)]  # noqa: E731
        self._result.set_result(
            RunData(
                split=plan.split,
                class_names=plan.class_names,
                train=self.train,
                val=by_patient(plan.split.val),
                test=by_patient(plan.split.test),
                class_weights=self._weights.result(),
            )
        )


def prepare_run_data(plan: RunPlan, config: ml_collections.ConfigDict) -> RunData:
    """Decodes (or reads from the cache) and resizes the planned cases."""
    settings = PreprocessSettings(image_size=config.data.image_size)
    prepared = prepare_cases(plan.cases, settings, cache_root(config.data) / "prepared")
    by_patient = lambda names: [p for p in prepared if p.patient in set(names)]  # noqa: E731
    train_cases = by_patient(plan.split.train)
    counts = sum(pipeline.class_counts(p.labels, len(plan.class_names)) for p in train_cases)
    check_training_labels(counts, plan.class_names, len(train_cases))
    return RunData(
        split=plan.split,
        class_names=plan.class_names,
        train=pipeline.SliceDataset.from_cases(
            train_cases, context=config.data.context_slices, share_classes=share_classes(plan, config)
        ),
        val=by_patient(plan.split.val),
        test=by_patient(plan.split.test),
        class_weights=pipeline.weights_from_counts(counts, config.train.class_weighting),
    )


def prepare_split(config: ml_collections.ConfigDict, split: str) -> list[PreparedCase]:
    """The prepared cases of one split ("train", "val" or "test") of the run's patients only."""
    plan = plan_run_data(config)
    settings = PreprocessSettings(image_size=config.data.image_size)
    cases = plan.cases_of(getattr(plan.split, split))
    return prepare_cases(cases, settings, cache_root(config.data) / "prepared")


def load_run_data(config: ml_collections.ConfigDict) -> RunData:
    """Finds, splits (by patient) and prepares the data a run trains, validates and tests on."""
    return prepare_run_data(plan_run_data(config), config)
