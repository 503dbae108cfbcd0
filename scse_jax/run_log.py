"""What a run writes as it goes: ``metrics.jsonl``, TensorBoard events, progress lines.

``metrics.jsonl`` holds one JSON object per line and per (split, epoch). Every change
rewrites it atomically (`files.atomic_write`), so a kill or a full disk never leaves a cut
line. After a restart the lines of epochs newer than the restored checkpoint are dropped, and
of repeated (split, epoch) records only the last is kept, so every epoch appears exactly once
however often the run was killed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from scse_jax import files


class RunLog:
    """The metrics file and TensorBoard writer of one run (a no-op on non-chief hosts)."""

    def __init__(self, workdir: Path, *, enabled: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def read_records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        return records

    def roll_back_to(self, completed_epochs: int) -> None:
        """Keeps only the records of epochs up to ``completed_epochs``, the last of each
        (split, epoch)."""
        if not self.enabled or not self.path.exists():
            return
        kept = {
            (r.get("split"), r.get("epoch")): r for r in self.read_records() if r.get("epoch", 0) <= completed_epochs
        }
        files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept.values()))

    def record(self, split: str, epoch: int, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"split": split, "epoch": epoch, "step": step, **values}
        before = self.path.read_text() if self.path.exists() else ""
        files.write_text(self.path, before + json.dumps(record) + "\n")
        self.scalars(step, _flatten(values, prefix=f"{split}/"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._tensorboard is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _flatten(values: dict[str, Any], prefix: str) -> dict[str, float]:
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix=f"{prefix}{name}/"))
        else:
            flat[prefix + name] = value
    return flat


def progress_line(
    step: int, total_steps: int, steps_per_epoch: int, mean_loss: float, images_per_s: float, batch_size: int, lr: float
) -> str:
    """``epoch 3/20 step 45/300 loss 0.5120 | 12.3 img/s | lr 4.0e-03 | eta 4m10s``."""
    epoch = (step - 1) // steps_per_epoch + 1
    seconds = (total_steps - step) * batch_size / images_per_s if images_per_s > 0 else 0.0
    return (
        f"epoch {epoch}/{total_steps // steps_per_epoch} step {step}/{total_steps} loss {mean_loss:.4f} | "
        f"{images_per_s:.1f} img/s | lr {lr:.1e} | eta {int(seconds // 60)}m{int(seconds % 60):02d}s"
    )
