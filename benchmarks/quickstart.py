"""Times the README's first command from a fresh workdir and records how well its model ends.

    python benchmarks/quickstart.py --json docs/benchmarks/quickstart.json [--seeds 0,1] [-- LAUNCH FLAGS]

Each seed runs `python launch.py --config configs/quickstart.py` as a user's first run: a new
temporary workdir and an empty cache folder, so that writing the synthetic data, preparing it
and compiling are all timed. The JSON records the wall time and the final validation Dice read
from the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scse_jax import files  # noqa: E402
from scse_jax.errors import ScseError  # noqa: E402

CONFIG = "configs/quickstart.py"


def final_validation(metrics_file: Path) -> dict:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    validations = [r for r in records if r.get("split") == "val"]
    if not validations:
        raise SystemExit(f"error: {metrics_file} holds no validation record")
    last = validations[-1]
    return {"epoch": last["epoch"], "dice_mean": last["dice_mean"], "dice": last["dice"], "volume_ratio": last["volume_ratio"]}


def time_one_run(seed: int, launch_flags: list[str], scratch: Path) -> dict:
    workdir = scratch / "run"
    command = [
        sys.executable, "launch.py", "--config", CONFIG, f"--workdir={workdir}",
        f"--config.data.cache_dir={scratch / 'cache'}", f"--config.train.seed={seed}", *launch_flags,
    ]  # fmt: skip
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # compile as a first run does
    subprocess.run(command, cwd=REPO, env=env, check=True)
    wall_s = time.perf_counter() - start
    return {"seed": seed, "wall_s": wall_s, **final_validation(workdir / "metrics.jsonl")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="where to write the measurements")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, one timed run each")
    parser.add_argument("launch_flags", nargs="*", help="extra launch.py flags, after --")
    args = parser.parse_args(argv)
    try:
        files.check_file_target(args.json, "--json")
    except ScseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="quickstart-") as scratch:
            runs.append(time_one_run(seed, args.launch_flags, Path(scratch)))
    result = {
        "command": f"python launch.py --config {CONFIG} " + " ".join(args.launch_flags),
        "runs": runs,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "min_dice_mean": min(r["dice_mean"] for r in runs),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_1m": os.getloadavg()[0]},
    }
    files.write_text(args.json, json.dumps(result, indent=2) + "\n")
    for run in runs:
        print(f"seed {run['seed']}: {run['wall_s'] / 60:.1f} min, final validation mean Dice {run['dice_mean']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
