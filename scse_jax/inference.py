"""Trained models for notebooks and scripts: one import, one call, one compiled function.

    from scse_jax.inference import Segmenter
    segmenter = Segmenter.from_checkpoint("runs/mr_scse_cpu")     # the run's eval.checkpoint; or which="best"
    labels = segmenter.segment_series("MR/1/T2SPIR/DICOM_anon")  # (slices, rows, cols) class ids

Prediction goes through `prediction.Predictor`, the same path as validation during training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from scse_jax import checkpoint, cpu_layout, postprocess, sharding
from scse_jax.data import pipeline, preprocess
from scse_jax.data.preprocess import PreparedCase
from scse_jax.data.types import Volume
from scse_jax.errors import CheckpointError, ConfigError
from scse_jax.prediction import Predictor
from scse_jax.state import abstract_train_state, build_model, make_optimizer


class Segmenter:
    """A trained network with its preprocessing, ready to segment slices, volumes and series.

    `from_checkpoint` called before JAX has started splits the CPU into one JAX device per
    physical core (`cpu_layout`, the fastest layout), unless the layout is already set;
    JAX_NUM_CPU_DEVICES=1 keeps one device. Prediction uses as many CPU devices as divide
    the batch.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        variables: dict[str, Any],
        class_names: tuple[str, ...],
        *,
        batch_size: int | None = None,
        step: int | None = None,
        largest_component: bool | None = None,
    ):
        """``largest_component`` (None: the run's eval.largest_component) keeps each organ's
        largest connected component in native-grid results (see `postprocess`)."""
        self.config = config
        self.largest_component = (
            config.eval.get("largest_component", False) if largest_component is None else largest_component
        )
        self.class_names = tuple(class_names)
        self.step = step
        self.chosen = f"step {step}"  # how the checkpoint was chosen (from_checkpoint says)
        self.settings = preprocess.PreprocessSettings(image_size=config.data.image_size)
        batch_size = batch_size or config.eval.batch_size
        mesh = sharding.make_data_mesh(cpu_layout.devices_for_batch(batch_size))
        self.predictor = Predictor(
            build_model(config.model, len(self.class_names)),
            mesh,
            batch_size=batch_size,
            image_size=config.data.image_size,
            context_slices=config.data.get("context_slices", 0),
        )
        self.variables = jax.device_put(variables, sharding.replicated_sharding(mesh))

    @property
    def traces(self) -> int:
        """How many times a prediction function was traced (= compiled)."""
        return self.predictor.traces

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        which: str | None = None,
        batch_size: int | None = None,
        largest_component: bool | None = None,
    ) -> "Segmenter":
        """Restores config, parameters and BatchNorm statistics from a run's workdir or checkpoint folder.

        Args:
          path: a workdir (holding ``checkpoints/``) or the checkpoint folder itself.
          which: "latest", "best" (highest validation Dice), a step number, or None: the run's
            ``eval.checkpoint``.
        """
        if which is not None:
            checkpoint.check_choice(which, " (which=, --which)")  # before JAX starts: a bad argument fails fast
        # Opening the checkpoints starts JAX, after which the layout cannot change.
        cpu_layout.set_up(cpu_layout.AUTO, [batch_size] if batch_size else [])
        directory = checkpoint.checkpoint_dir(path)
        ckpts = checkpoint.Checkpoints(directory, read_only=True)
        try:
            step = ckpts.chosen_step(which)
            meta = ckpts.restore_meta(step)
            if "config" not in meta or "class_names" not in meta:
                raise CheckpointError(f"{directory / str(step)} is not a scse_jax checkpoint (no config in it)")
            config = ml_collections.ConfigDict(meta["config"])
            class_names = tuple(meta["class_names"])
            state = _restore_state(ckpts, step, meta, config, len(class_names))
        finally:
            ckpts.close()
        segmenter = cls(
            config, state.variables(), class_names, batch_size=batch_size, step=step, largest_component=largest_component
        )
        run_choice = config.eval.get("checkpoint", "best")
        segmenter.chosen = f"step {step}, " + (f"which={which}" if which is not None else f"the run's eval.checkpoint: {run_choice}")
        return segmenter

    def segment(self, images: np.ndarray, *, probabilities: bool = False, tta: bool = False) -> np.ndarray:
        """Segments preprocessed slices on the training grid.

        Args:
          images: (N, S, S) normalised consecutive slices of one volume (a model trained with
            data.context_slices = k reads each with k neighbours on either side), or
            (N, S, S, 2k + 1) slices already stacked with their neighbours (`pipeline.with_context`).
          probabilities: return (N, S, S, C) class probabilities instead of (N, S, S) class ids.
          tta: average over small shifts (anatomy-preserving test-time augmentation).
        """
        return self.predictor.predict(self.variables, images, probabilities=probabilities, tta=tta)

    def segment_volume(
        self, volume: Volume | np.ndarray, *, modality: str | None = None, probabilities: bool = False, tta: bool = False
    ) -> np.ndarray:
        """Segments a whole native volume (slices, rows, cols) and returns it on the native grid.

        Preprocessing is the training one (normalisation, resizing); class ids come back
        (slices, rows, cols) uint8, or probabilities (slices, rows, cols, C) float32, resized
        bilinearly as the class ids' are, so that their argmax is the class ids before the
        largest-component post-processing.
        """
        voxels = volume.voxels if isinstance(volume, Volume) else np.asarray(volume, np.float32)
        if voxels.ndim != 3 or 0 in voxels.shape:
            raise ConfigError(f"segment_volume() expects a (slices, rows, cols) volume with voxels, got {voxels.shape}")
        modality = modality or self.config.data.modality
        images = preprocess.resize_slices(preprocess.normalise(voxels, modality, self.settings), self.settings.image_size)
        if not probabilities:
            return self.segment_to_native(images, voxels.shape[1:], tta=tta)
        return preprocess.resize_probabilities(self.segment(images, probabilities=True, tta=tta), voxels.shape[1:])

    def segment_to_native(self, images: np.ndarray, native_rows_cols: tuple[int, int], *, tta: bool = False):
        """Class ids of preprocessed slices, on the native (rows, cols) grid, post-processed."""
        return postprocess.to_native(
            self.segment(images, probabilities=True, tta=tta), native_rows_cols, largest_component=self.largest_component
        )

    def segment_case(self, case: PreparedCase) -> np.ndarray:
        """Class ids of a prepared case on its native grid, post-processed (what is scored)."""
        return self.segment_to_native(case.images, case.native_shape[1:])

    def segment_series(self, dicom_dir: str | Path, **kwargs) -> np.ndarray:
        """Segments a DICOM series folder; returns (slices, rows, cols) in the series' file order."""
        from scse_jax.data import dicom

        files = dicom.series_files(dicom_dir)
        voxels, geometry = dicom.read_series(files)
        return self.segment_volume(Volume(voxels, geometry), **kwargs)


def _restore_state(ckpts, step: int, meta: dict[str, Any], config: ml_collections.ConfigDict, num_classes: int):
    model = build_model(config.model, num_classes)
    tx = make_optimizer(config.train, meta["steps_per_epoch"])
    abstract = abstract_train_state(
        model, tx, image_size=config.data.image_size, mesh=sharding.make_data_mesh(),
        channels=pipeline.input_channels(config.data),
    )
    state, _ = ckpts.restore(step, abstract)
    return state
