"""`lm merge`: fold a LoRA adapter into its base and write a plain checkpoint."""

from __future__ import annotations

from pathlib import Path

from lm.errors import LMError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "merge", help="merge a LoRA adapter into its base: a plain checkpoint, same outputs"
    )
    p.add_argument("adapter", help="adapter directory (written by lm train --lora-rank)")
    p.add_argument("out", help="checkpoint directory to write")
    p.set_defaults(func=run)


def run(args) -> int:
    from lm.checkpoint import CONFIG_FILE, save_checkpoint
    from lm.lora import load_adapter_checkpoint

    out = Path(args.out)
    if (out / CONFIG_FILE).exists():
        raise LMError(f"{out} already holds a checkpoint; choose another directory")
    merged = load_adapter_checkpoint(args.adapter)
    adapter = merged.meta["adapter"]
    training = dict(
        merged.training,
        merged_from={
            "adapter": Path(args.adapter).resolve().name,
            "base": adapter["base"],
            "rank": adapter["rank"],
            "alpha": adapter["alpha"],
        },
    )
    save_checkpoint(out, merged.model, merged.tokenizer, training)
    print(f"merged {args.adapter} into {adapter['base']['name']}: {out}")
    return 0
