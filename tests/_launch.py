"""Real ``launch.py`` subprocesses on tiny synthetic data, watched line by line (shared by fault tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 2  # 2 training patients x 8 slices / batch 8 (4 folds, 1 test and 1 val patient)


def write_tiny_tree(root: Path) -> Path:
    from scse_jax.data import synthetic

    synthetic.write_synthetic_chaos(root, patients=5, size=32, slices=8, seed=0, modalities=("MR",))
    return root


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """One CPU device (unless asked; pinned, so that launch.py's auto layout does not depend on
    the machine's cores), the tests' persistent compilation cache, no GPU probing."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SCSE_PLAIN_MALLOC", "GLIBC_TUNABLES")}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        JAX_COMPILATION_CACHE_DIR=str(REPO / ".cache" / "jax_tests"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONUNBUFFERED="1",
    )
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    return env


def launch_args(
    workdir: Path, data_root: Path, cache_dir: Path, *overrides: str, config: str = "configs/default.py"
) -> list[str]:
    return [
        sys.executable, "launch.py", "--config", config, f"--workdir={workdir}",
        f"--config.data.root={data_root}", f"--config.data.cache_dir={cache_dir}",
        "--config.data.image_size=32", "--config.data.num_folds=4", "--config.model.features=4",
        "--config.train.batch_size=8", "--config.eval.batch_size=8", "--config.train.log_every_steps=1",
        "--config.eval.num_overlays=1", *overrides,
    ]  # fmt: skip


class Run:
    """A running ``launch.py``; its stdout and stderr lines are collected as they arrive."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.args = args
        self.process = subprocess.Popen(
            args, cwd=REPO, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._collect, args=(self.process.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._collect, args=(self.process.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _collect(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_until(
        self, condition: Callable[[], bool], what: str, timeout: float = 180.0, interval: float = 0.001
    ) -> None:
        """Polls ``condition`` every ``interval`` seconds or so; fails if the run ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.finish()
                raise AssertionError(f"never saw {what}; exit {self.process.returncode}\n{self.output}")
            time.sleep(interval)

    def saw_line(self, text: str) -> bool:
        return any(text in line for line in list(self.stdout))

    def finish(self, timeout: float = 300.0) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.stdout) + "\n--- stderr ---\n" + "\n".join(self.stderr)


def paused_at(point: str, marker: Path, args: list[str]) -> list[str]:
    """`args` (from `launch_args`) made to create `marker` and stop at `point` (see tests/_pause.py)."""
    return [args[0], "-m", "tests._pause", point, str(marker), *args[1:]]


def run_to_end(args: list[str], env: dict[str, str] | None = None) -> Run:
    run = Run(args, env)
    run.finish()
    return run


def read_metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the line a kill cut short
    return records


def complete_steps(checkpoint_dir: Path) -> list[int]:
    """Step folders orbax has committed (renamed from their temporary names)."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(int(entry.name) for entry in checkpoint_dir.iterdir() if entry.name.isdigit())


def temporary_folders(checkpoint_dir: Path) -> list[str]:
    if not checkpoint_dir.is_dir():
        return []
    return sorted(entry.name for entry in checkpoint_dir.iterdir() if ".orbax-checkpoint-tmp" in entry.name)


def restore_state(workdir: Path, step: int):
    """The full TrainState (params, batch_stats, opt_state, step) of a run's checkpoint, on one device."""
    import jax
    import ml_collections

    from scse_jax import checkpoint, sharding
    from scse_jax.state import abstract_train_state, build_model, make_optimizer

    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    model = build_model(config.model, num_classes=5)
    tx = make_optimizer(config.train, STEPS_PER_EPOCH)
    mesh = sharding.make_data_mesh(jax.devices()[:1])
    abstract = abstract_train_state(model, tx, image_size=config.data.image_size, mesh=mesh)
    ckpts = checkpoint.Checkpoints(workdir / "checkpoints", read_only=True)
    try:
        state, _ = ckpts.restore(step, abstract)
    finally:
        ckpts.close()
    return jax.device_get(state)
