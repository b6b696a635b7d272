"""`lm check`: load and validate checkpoints (shapes, dtypes, finite weights), one line each."""

from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "check",
        help="validate checkpoints: one line each, non-zero exit if any is bad",
        description="Load each checkpoint as `lm serve` would and check every weight against "
        "config.json (shape, dtype, finite values). With no argument: every shipped checkpoint.",
    )
    p.add_argument(
        "checkpoints",
        nargs="*",
        metavar="CHECKPOINT",
        help="shipped name or directory (default: all shipped)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from lm.checkpoint import check_checkpoint, shipped_checkpoints, shipped_dir
    from lm.errors import LMError

    names = args.checkpoints or shipped_checkpoints()
    if not names:
        raise LMError(f"no shipped checkpoints in {shipped_dir()}; name one or more to check")
    bad = 0
    for name in names:
        problem = check_checkpoint(name)
        if problem is None:
            print(f"{name}: ok")
        else:
            bad += 1
            print(f"{name}: {problem}")
    if bad:
        print(f"lm check: {bad} of {len(names)} checkpoints are bad", file=sys.stderr)
    return 1 if bad else 0
