"""Trainable-parameter counts of the U-Net with and without SE blocks.

    python -m scse_jax.models.summary --features 16 --num-classes 5

Shapes only (jax.eval_shape): nothing is initialised or computed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from scse_jax.models.unet import (
    DEFAULT_SE_POSITIONS,
    DEPTH,
    SE_KINDS,
    SE_POSITIONS,
    UPSAMPLINGS,
    UNet,
    count_params,
)

# The capstone report's network puts SE blocks after encoder and decoder blocks only (UNet's
# default); its "about 2%" overhead refers to that placement.
REPORT_SE_POSITIONS = DEFAULT_SE_POSITIONS


def unet_param_count(
    *, num_classes: int, features: int = 16, in_channels: int = 1, **unet_kwargs
) -> int:
    """Trainable parameters (the "params" collection) of UNet(num_classes, features, ...)."""
    model = UNet(num_classes=num_classes, features=features, **unet_kwargs)
    side = 2**DEPTH
    image = jax.ShapeDtypeStruct((1, side, side, in_channels), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), image
    )
    return count_params(variables["params"])


def se_param_counts(
    *,
    num_classes: int,
    features: int = 16,
    in_channels: int = 1,
    se_reduction: int = 2,
    se_positions: Sequence[str] = SE_POSITIONS,
    upsample: str = "bilinear",
    deep_supervision: bool = False,
) -> dict[str, int]:
    """Parameter counts keyed by SE kind ("none", "cse", "sse", "scse"); with
    ``deep_supervision``, the decoder's 1x1 heads included."""
    return {
        kind: unet_param_count(
            num_classes=num_classes,
            features=features,
            in_channels=in_channels,
            se=kind,
            se_reduction=se_reduction,
            se_positions=tuple(se_positions),
            upsample=upsample,
            deep_supervision=deep_supervision,
        )
        for kind in SE_KINDS
    }


def overhead_table(counts: dict[str, int]) -> str:
    """A small text table: parameters per SE kind and the % over the plain U-Net."""
    base = counts["none"]
    lines = [f"{'se':<6}{'params':>12}{'overhead':>11}"]
    for kind, count in counts.items():
        lines.append(f"{kind:<6}{count:>12,}{100 * (count - base) / base:>10.2f}%")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--reduction", type=int, default=2)
    parser.add_argument("--upsample", choices=UPSAMPLINGS, default="bilinear")
    parser.add_argument(
        "--deep-supervision", action="store_true", help="count the 1x1 deep-supervision heads (model.deep_supervision)"
    )
    parser.add_argument(
        "--positions", nargs="+", choices=SE_POSITIONS, default=None,
        help="where SE blocks go (default: one table for all positions, one for the "
        "report's encoder and decoder only)",
    )
    args = parser.parse_args(argv)
    placements = [args.positions] if args.positions else [SE_POSITIONS, REPORT_SE_POSITIONS]
    for positions in placements:
        counts = se_param_counts(
            num_classes=args.num_classes,
            features=args.features,
            in_channels=args.in_channels,
            se_reduction=args.reduction,
            se_positions=positions,
            upsample=args.upsample,
            deep_supervision=args.deep_supervision,
        )
        print(
            f"UNet features={args.features} classes={args.num_classes} in={args.in_channels} "
            f"r={args.reduction} upsample={args.upsample}{' deep supervision' * args.deep_supervision}; "
            f"SE after {', '.join(positions)}"
        )
        print(overhead_table(counts), end="\n\n")

if __name__ == "__main__":
    main()
