"""`lm eval`: loss, perplexity and bits/char of a checkpoint on a corpus."""

from __future__ import annotations

import json

from lm.commands._args import positive_int
from lm.device import MODEL_DTYPES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="loss, perplexity and bits/char of a checkpoint on a corpus"
    )
    p.add_argument("--checkpoint", required=True, help="shipped name or directory")
    p.add_argument("--corpus", action="append", required=True)
    p.add_argument(
        "--split",
        choices=["val", "all"],
        default="val",
        help="the held-out tail the model was validated on (default) or the whole corpus",
    )
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--max-tokens", type=positive_int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--dtype",
        choices=MODEL_DTYPES,
        default="float32",
        help="weights' precision (default float32, as trained; bfloat16 measures its cost)",
    )
    p.add_argument(
        "--loss-mask",
        action="append",
        metavar="PATH",
        help="score only the characters this file marks (one byte per corpus character, "
        "as lm train --loss-mask); one per --corpus",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from lm.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        args.corpus,
        args.split,
        args.val_fraction,
        args.max_tokens,
        args.device,
        args.dtype,
        args.loss_mask,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
            f"bpc {result['bpc']:.4f}  tokens {result['tokens']}"
        )
    return 0
