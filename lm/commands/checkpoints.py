"""`lm checkpoints`: the shipped checkpoints as a table or JSON."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("checkpoints", help="list the shipped checkpoints")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from lm.checkpoint import describe_shipped, shipped_dir

    rows = describe_shipped()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no shipped checkpoints in {shipped_dir()}")
        return 0
    print(
        f"{'name':<26} {'model':<5} {'tokens':<6} {'params':>9} {'size':>8} {'val loss':>8} {'bpc':>6}"
    )
    for r in rows:
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        bpc = f"{r['val_bpc']:.3f}" if r["val_bpc"] is not None else "-"
        print(
            f"{r['name']:<26} {r['model']:<5} {r['tokenizer']:<6} {r['params'] or 0:>9,} "
            f"{r['size_mb']:>6.1f}MB {loss:>8} {bpc:>6}"
        )
    return 0
