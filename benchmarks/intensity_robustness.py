"""How a trained model's Dice holds up when its test patients' grey levels are remapped.

    python benchmarks/intensity_robustness.py RUN [RUN ...] --json OUT.json [--gammas 0.5,0.7,1,1.5,2]

Each run's best checkpoint segments the held-out patients of its own split, once per gamma:
every raw volume is remapped as v' = max(v) * (v / max(v)) ** gamma before the usual
preprocessing. Per-volume z-scoring removes any global scale and shift, but not a change in
how organs' grey levels relate to each other, which is what a gamma brings and what differs
between scanners, protocols and patients (an organ darkened by iron, say). A model that reads
organs from their contrast with their neighbours keeps its Dice; one that reads them from
absolute grey levels loses it. The JSON has the mean Dice per organ and gamma for each run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scse_jax import files, metrics  # noqa: E402
from scse_jax.errors import ConfigError, ScseError  # noqa: E402


def remap(voxels: np.ndarray, gamma: float) -> np.ndarray:
    """v' = max(v) * (v / max(v)) ** gamma over the non-negative part of the volume."""
    voxels = np.clip(np.asarray(voxels, np.float64), 0.0, None)
    top = voxels.max()
    if top <= 0:
        return voxels.astype(np.float32)
    return (top * (voxels / top) ** gamma).astype(np.float32)


def run_robustness(run: Path, gammas: list[float]) -> dict:
    from scse_jax.data import chaos
    from scse_jax.data.run_data import plan_run_data
    from scse_jax.evaluate import config_on_this_machine
    from scse_jax.inference import Segmenter

    segmenter = Segmenter.from_checkpoint(run, which="best")
    config = config_on_this_machine(segmenter.config)
    plan = plan_run_data(config)
    cases = plan.cases_of(plan.split.test)
    if not cases:
        raise ConfigError(f"the run in {run} has no test patients")
    organs = segmenter.class_names[1:]
    dice = {gamma: {organ: [] for organ in organs} for gamma in gammas}
    for case in cases:
        volume = chaos.load_case(case)
        for gamma in gammas:
            prediction = segmenter.segment_volume(remap(volume.voxels, gamma), modality=case.modality)
            for class_id, organ in enumerate(organs, start=1):
                scores = metrics.binary_scores(prediction == class_id, volume.labels == class_id, volume.geometry)
                dice[gamma][organ].append(scores["dice"])
            mean = np.mean([dice[gamma][organ][-1] for organ in organs])
            print(f"{run.name} patient {case.patient} gamma {gamma:g}: mean Dice {mean:.3f}", flush=True)
    return {
        "run": str(run),
        "step": segmenter.step,
        "patients": [case.patient for case in cases],
        "dice": {
            f"{gamma:g}": {**{organ: float(np.mean(v)) for organ, v in by_organ.items()},
                           "mean": float(np.mean([np.mean(v) for v in by_organ.values()]))}
            for gamma, by_organ in dice.items()
        },  # fmt: skip
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run workdirs (launch.py --workdir)")
    parser.add_argument("--json", type=Path, required=True, help="where to write the Dice per run and gamma")
    parser.add_argument("--gammas", default="0.5,0.7,1,1.5,2", help="comma-separated gammas")
    args = parser.parse_args(argv)
    try:
        gammas = [float(g) for g in args.gammas.split(",")]
        if not gammas or min(gammas) <= 0:
            raise ConfigError(f"--gammas must be positive numbers, got {args.gammas!r}")
        files.check_file_target(args.json, "--json")
        results = [run_robustness(run, gammas) for run in args.runs]
        files.write_text(args.json, json.dumps({"gammas": gammas, "runs": results}, indent=2) + "\n")
    except (ScseError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
