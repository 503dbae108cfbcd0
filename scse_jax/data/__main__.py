"""Command line for the data: `python -m scse_jax.data info PATH [--json]` and `... synth OUT`.

Errors print one line (`error: ...`) on stderr: exit code 2 for usage, 1 for bad data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from scse_jax.data import chaos
from scse_jax.data.types import SEQUENCES
from scse_jax.errors import ConfigError, ScseError

USAGE_ERROR, DATA_ERROR = 2, 1


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m scse_jax.data", description="Inspect or synthesise CHAOS data.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    info = commands.add_parser("info", help="list the cases under a CHAOS tree, case folder or NIfTI folder")
    info.add_argument("path", type=Path)
    info.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    info.add_argument("--sequences", nargs="+", choices=SEQUENCES, help="only these sequences")
    synth = commands.add_parser("synth", help="write a synthetic CHAOS-format tree")
    synth.add_argument("out", type=Path)
    synth.add_argument("--patients", type=int, default=6)
    synth.add_argument("--size", type=int, default=128, help="rows and columns per slice")
    synth.add_argument("--slices", type=int, default=14)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--modalities", nargs="+", choices=("CT", "MR"), default=["CT", "MR"])
    return parser


def describe_cases(path: Path, sequences: Sequence[str] | None = None) -> list[dict]:
    """One record per case: patient, modality, sequence, shape, spacing_mm, label_voxels."""
    records = []
    for case in chaos.find_cases(path, sequences=sequences):
        volume = chaos.load_case(case)
        records.append(
            {
                "patient": case.patient,
                "modality": case.modality,
                "sequence": case.sequence,
                "shape": list(volume.voxels.shape),
                "spacing_mm": [round(s, 7) for s in volume.geometry.spacing_mm],
                "label_voxels": chaos.label_voxels(volume, case.class_names),
            }
        )
    return records


def format_table(records: list[dict]) -> str:
    """A readable table of describe_cases() records."""
    header = ("patient", "modality", "sequence", "shape", "spacing_mm", "label_voxels")
    rows = [
        (
            r["patient"],
            r["modality"],
            r["sequence"],
            " x ".join(str(n) for n in r["shape"]),
            " x ".join(f"{s:.7g}" for s in r["spacing_mm"]),
            "none" if r["label_voxels"] is None
            else ", ".join(f"{name}={count}" for name, count in r["label_voxels"].items() if name != "background"),
        )
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines + [f"{len(records)} case(s)"])


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    try:
        if args.command == "info":
            records = describe_cases(args.path, args.sequences)
            print(json.dumps(records, indent=1) if args.json else format_table(records))
        else:
            from scse_jax.data import synthetic  # scipy is slow to import and `info` does not need it

            out = synthetic.write_synthetic_chaos(
                args.out,
                patients=args.patients,
                slices=args.slices,
                size=args.size,
                seed=args.seed,
                modalities=tuple(args.modalities),
            )
            print(f"wrote synthetic CHAOS tree to {out}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except (ScseError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return DATA_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
