"""From a run's data config to what training needs: prepared patients, split, class weights."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import ml_collections
import numpy as np

from scse_jax.data import chaos, pipeline, synthetic
from scse_jax.data.preprocess import PreparedCase, PreprocessSettings, prepare_cases
from scse_jax.data.types import Case
from scse_jax.errors import ConfigError


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
    patients = list(dict.fromkeys(case.patient for case in cases))
    split = pipeline.split_patients(
        patients,
        num_folds=data_config.num_folds,
        fold=data_config.fold,
        num_val=data_config.num_val_patients,
        seed=data_config.split_seed,
    )
    return RunPlan(cases=cases, split=split, class_names=cases[0].class_names)


def prepare_run_data(plan: RunPlan, config: ml_collections.ConfigDict) -> RunData:
    """Decodes (or reads from the cache) and resizes the planned cases."""
    settings = PreprocessSettings(image_size=config.data.image_size)
    prepared = prepare_cases(plan.cases, settings, cache_root(config.data) / "prepared")
    by_patient = lambda names: [p for p in prepared if p.patient in set(names)]  # noqa: E731
    train_cases = by_patient(plan.split.train)
    return RunData(
        split=plan.split,
        class_names=plan.class_names,
        train=pipeline.SliceDataset.from_cases(train_cases),
        val=by_patient(plan.split.val),
        test=by_patient(plan.split.test),
        class_weights=pipeline.class_weights([p.labels for p in train_cases], len(plan.class_names)),
    )


def load_run_data(config: ml_collections.ConfigDict) -> RunData:
    """Finds, splits (by patient) and prepares the data a run trains, validates and tests on."""
    return prepare_run_data(plan_run_data(config), config)
