"""Every orbax call of the project, in one place (orbax's API moves).

A checkpoint is one orbax step folder under ``<workdir>/checkpoints`` with two items:
``state`` (the TrainState pytree) and ``meta`` (JSON: the run's config, the epoch and step,
partial-epoch loss sums, the validation score, and a SHA-256 of each process's copy of the
state, which must be equal, as only one copy is written). orbax writes into a temporary folder
and renames it when complete, so a save killed midway never leaves a step that ``latest_step``
reports. The latest ``keep_latest`` checkpoints are kept, plus the best by validation Dice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from scse_jax import sharding
from scse_jax.errors import CheckpointError

STATE = "state"
META = "meta"
BEST_METRIC = "val_dice"
STATE_DIGESTS = "state_digests"
# What a run's users restore unless told otherwise (eval.checkpoint).
CHOICES = ("best", "latest")


def check_choice(which: str, where: str = "") -> None:
    """Raises CheckpointError unless ``which`` is "best", "latest" or a step number; ``where``
    names the argument it came from in the message."""
    if which not in CHOICES and not str(which).isdigit():
        raise CheckpointError(f"checkpoint {which!r}: expected latest, best or a step number{where}")


def checkpoint_dir(workdir_or_checkpoint_dir: str | Path) -> Path:
    """``<workdir>/checkpoints`` for a run's workdir, or the path itself for a checkpoint folder."""
    path = Path(workdir_or_checkpoint_dir).expanduser()
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def has_saved_step(workdir: str | Path) -> bool:
    """Whether a run's workdir holds a saved step, without opening the checkpoints."""
    return any(entry.name.isdigit() for entry in (Path(workdir) / "checkpoints").glob("*"))


class Checkpoints:
    """The checkpoints of one run: save, list, restore."""

    def __init__(self, directory: str | Path, *, keep_latest: int = 2, read_only: bool = False):
        self.directory = Path(directory).expanduser().absolute()  # orbax needs absolute paths
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint folder at {self.directory}")
        _refuse_foreign_entries(self.directory)
        preservation = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=keep_latest),
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            enable_async_checkpointing=False,
            read_only=read_only,
            create=not read_only,
            # Folders of saves killed midway are never trusted; removing them on start keeps
            # them from piling up (orbax refuses the option in read-only mode).
            cleanup_tmp_directories=not read_only,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, META))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot open checkpoint folder {self.directory}: {_first_line(error)}") from error
        # orbax removes those folders in a thread that nothing else waits for: a process that
        # exits soon after opening would cut it short (a traceback, the folders left behind).
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the highest validation Dice, or None when none was scored."""
        scored = [(meta.get(BEST_METRIC), step) for step in self.steps() for meta in [self.restore_meta(step)]]
        scored = [(score, step) for score, step in scored if score is not None]
        return max(scored)[1] if scored else None

    def chosen_step(self, which: str | None) -> int:
        """The step of "best", "latest" or a step number; None: the run's own ``eval.checkpoint``
        (read from the latest checkpoint's config; "best" for runs from before that field)."""
        if which is None:
            latest = self.latest_step()
            if latest is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
            which = self.restore_meta(latest)["config"].get("eval", {}).get("checkpoint", "best")
        check_choice(which)
        if which == "latest":
            step = self.latest_step()
        elif which == "best":
            step = self.best_step()
        else:
            step = int(which)
            if step not in self.steps():
                raise CheckpointError(f"no checkpoint {step} in {self.directory}; there are {self.steps()}")
        if step is None:
            unscored = which == "best" and bool(self.steps())
            hint = '; none has a validation score (which="latest" works)' if unscored else ""
            raise CheckpointError(f"no {which} checkpoint in {self.directory}{hint}")
        return step

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves and waits until the checkpoint is complete on disk; every process must call it."""
        digests = sharding.process_digests(state)
        if len(set(digests)) > 1:
            raise CheckpointError(
                f"not saving checkpoint {step}: the processes' copies of the training state differ "
                f"(SHA-256 {', '.join(digest[:12] for digest in digests)})"
            )
        meta = {**meta, STATE_DIGESTS: digests}
        metrics = {BEST_METRIC: meta[BEST_METRIC]} if meta.get(BEST_METRIC) is not None else None
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}),
                metrics=metrics,
                force=True,
            )
            self._manager.wait_until_finished()
        except Exception as error:  # orbax raises many types; none may pass silently
            raise CheckpointError(
                f"saving checkpoint {step} under {self.directory} failed ({_first_line(error)}); "
                "the previous checkpoints are untouched"
            ) from error

    def restore_meta(self, step: int) -> dict[str, Any]:
        path = self.directory / str(step) / META / "metadata"
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"{self.directory / str(step)} is not a scse_jax checkpoint (unreadable {META}/{path.name}: {error})"
            ) from error
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or meta.get("step") != step:
            raise CheckpointError(f"{path} is not the metadata of a scse_jax checkpoint of step {step}")
        return meta

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the state into the shapes, dtypes and shardings of ``abstract_state``."""
        meta = self.restore_meta(step)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)})
            )
        except Exception as error:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} does not match this model or is corrupt: "
                f"{_first_line(error)}"
            ) from error
        return restored[STATE], meta

    def close(self) -> None:
        self._manager.close()


def _refuse_foreign_entries(directory: Path) -> None:
    """Refuses a folder that holds anything besides orbax step folders (another program's)."""
    if not directory.is_dir():
        return
    foreign = sorted(
        entry.name
        for entry in directory.iterdir()
        if not (entry.name.isdigit() or ".orbax-checkpoint-tmp" in entry.name or entry.name.startswith("_"))
    )
    if foreign:
        raise CheckpointError(
            f"{directory} holds files that are not scse_jax checkpoints ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); use another --workdir"
        )


def _first_line(error: Exception, limit: int = 300) -> str:
    """orbax and tensorstore errors run over many lines; the first names the problem."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."
