"""Command line for the data: `python -m scse_jax.data info PATH [--json]`, `... synth OUT` and
`... download DIR [--sets train,test] [--url-base URL]` (the real CHAOS data, see download.py).

Errors print one line (`error: ...`) on stderr: exit code 2 for usage, 1 for bad data.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from scse_jax.data import chaos, download
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
    fetch = commands.add_parser(
        "download", help="download, verify and unpack the CHAOS data (Zenodo record 3431873)"
    )
    fetch.add_argument("dir", type=Path, metavar="DIR", help="folder to unpack into (created if missing)")
    fetch.add_argument(
        "--sets", type=_set_names, default=("train", "test"), metavar="train,test",
        help=f"comma-separated, some of {','.join(download.ARCHIVES)} (default: all)",
    )
    fetch.add_argument(
        "--url-base", default=download.DEFAULT_URL_BASE, metavar="URL",
        help="folder URL holding the same zips (a mirror); default: the Zenodo record",
    )
    return parser


def _set_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in download.ARCHIVES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a comma-separated list of {', '.join(download.ARCHIVES)}"
        )
    return tuple(dict.fromkeys(names))


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


def run_download(directory: Path, sets: Sequence[str], url_base: str) -> None:
    """Downloads the sets, then prints each one's `info` table and the commands that use it."""
    roots = download.download(directory, sets, url_base=url_base)
    for set_name, root in roots:
        print(f"{set_name}: {root}")
        print(format_table(describe_cases(root)))
    print(next_steps(dict(roots)))


def next_steps(roots: dict[str, Path]) -> str:
    """The commands that train on the downloaded training set and segment its test set."""
    lines = []
    if "train" in roots:
        lines += [
            "train on it (the CPU recipe; configs/mr_scse.py is the report's):",
            f"  python launch.py --config configs/mr_scse_cpu.py --config.data.root={shlex.quote(str(roots['train']))}"
            " --workdir runs/mr_scse_cpu",
        ]
    if "test" in roots:
        lines += [
            "write CHAOS submission PNGs for the test set with a trained run:",
            "  python -m scse_jax.predict --checkpoint runs/mr_scse_cpu"
            f" --input {shlex.quote(str(roots['test']))} --output submission",
        ]
    return "\n".join(lines)


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
        elif args.command == "download":
            run_download(args.dir, args.sets, args.url_base)
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
    except KeyboardInterrupt:
        resume = "; the same command resumes the download" if args.command == "download" else ""
        print(f"error: interrupted{resume}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
