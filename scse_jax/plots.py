"""Pictures of a run: loss curves and validation overlays (matplotlib, no screen needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: never changes a notebook's backend

from scse_jax import files

# Overlay colours per class id: liver, right kidney, left kidney, spleen.
CLASS_COLOURS = np.array(
    [[0, 0, 0], [230, 90, 60], [60, 160, 230], [90, 210, 90], [220, 200, 60]], dtype=np.float32
) / 255.0


def loss_points(records: list[dict[str, Any]], split: str) -> list[tuple[int, float]]:
    """(epoch, loss) of one split's metrics.jsonl records, in epoch order."""
    return sorted((r["epoch"], r["loss"]) for r in records if r.get("split") == split and "loss" in r)


def save_figure(fig: Figure, path: Path, *, dpi: float | None = None) -> Path:
    """Writes a figure atomically (files.atomic_write), in the format its suffix names, at
    ``dpi`` (default: the figure's own)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_write(path, "wb") as stream:
        fig.savefig(stream, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return path


def plot_loss_curves(records: list[dict[str, Any]], path: Path) -> Path:
    """Training and validation loss per epoch, as the report's figures 2-5."""
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    for split, style in (("train", "-o"), ("val", "-s")):
        points = loss_points(records, split)
        if points:
            epochs, values = zip(*points)
            ax.plot(epochs, values, style, label=split, markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (weighted CE + Dice)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An RGB picture of a 2-D image with class ids painted over it."""
    low, high = np.percentile(image, (1, 99))
    gray = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    colours = CLASS_COLOURS[np.clip(labels, 0, len(CLASS_COLOURS) - 1)]
    painted = labels > 0
    rgb[painted] = (1 - alpha) * rgb[painted] + alpha * colours[painted]
    return rgb


def save_panels(panels: list[tuple[str, np.ndarray]], path: Path) -> Path:
    """Side-by-side RGB or gray panels with titles, one row."""
    fig = Figure(figsize=(3 * len(panels), 3.2), dpi=100)
    axes = fig.subplots(1, len(panels))
    for ax, (title, picture) in zip(np.atleast_1d(axes), panels):
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def busiest_slice(labels: np.ndarray) -> int:
    """The slice with the most foreground, a good one to show."""
    return int(np.argmax((labels > 0).reshape(len(labels), -1).sum(axis=1)))


def save_case_panels(case, named_predictions: dict[str, np.ndarray], path: Path, index: int | None = None) -> Path:
    """image | one panel per named native-grid prediction | ground truth, for one slice.

    Shown on the training grid; the busiest ground-truth slice unless ``index`` is given.
    """
    from scse_jax.data.preprocess import resize_labels

    index = busiest_slice(case.labels) if index is None else index
    image = case.images[index]
    panels = [("image", image)]
    for name, prediction in named_predictions.items():
        on_grid = resize_labels(prediction[index : index + 1], image.shape[:2])[0]
        panels.append((name, overlay(image, on_grid)))
    panels.append(("ground truth", overlay(image, case.labels[index])))
    return save_panels(panels, path)


def save_validation_overlays(cases, predictions: dict[str, np.ndarray], out_dir: Path) -> list[Path]:
    """image | prediction | ground truth for the busiest slice of each case."""
    return [
        save_case_panels(case, {"prediction": predictions[case.case_key]}, Path(out_dir) / f"{case.case_key}.png")
        for case in cases
        if case.case_key in predictions
    ]
