"""`lm export`: a checkpoint as a transformers folder (--format hf) or a GGUF file (--format gguf)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from lm.export import FORMATS

    p = subparsers.add_parser(
        "export", help="export a GPT checkpoint for transformers (hf) or llama.cpp (gguf)"
    )
    p.add_argument("checkpoint", help="shipped name or checkpoint directory")
    p.add_argument("out", help="hf: a new directory; gguf: the .gguf file to write")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from lm.export import export

    out = export(args.checkpoint, args.out, args.format)
    print(f"wrote {out}")
    return 0
