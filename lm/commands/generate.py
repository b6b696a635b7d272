"""`lm generate`: text from a prompt, streamed to the terminal; few-shot examples optional."""

from __future__ import annotations

import sys

from lm.commands._args import (
    escaped,
    max_new_tokens,
    non_negative_float,
    non_negative_int,
    positive_int,
    unit_interval,
)
from lm.device import MODEL_DTYPES
from lm.errors import LMError


def add_parser(subparsers) -> None:
    from lm.checkpoint import DEFAULT_CHECKPOINT

    p = subparsers.add_parser(
        "generate", help="generate text from a prompt (streams to the terminal)"
    )
    p.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="the prompt; '-' or nothing reads standard input. With few-shot examples, the query",
    )
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="shipped name or directory")
    p.add_argument("--max-new-tokens", type=max_new_tokens, default=256)
    p.add_argument(
        "--temperature", type=non_negative_float, default=0.8, help="0 is greedy (default 0.8)"
    )
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 turns it off")
    p.add_argument("--top-p", type=unit_interval, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        type=escaped,
        help="stop sequence (repeatable; \\n is a line end, \\t a tab)",
    )
    p.add_argument("--n", type=positive_int, default=1, help="samples per prompt")
    p.add_argument(
        "--example",
        action="append",
        default=None,
        metavar="IN=>OUT",
        help="a few-shot example (repeatable)",
    )
    p.add_argument("--examples", metavar="FILE.jsonl", help='few-shot examples {"input", "output"}')
    p.add_argument(
        "--template",
        default=None,
        type=escaped,
        help="few-shot template (default '{input} => {output}\\n'; \\n is a line end, \\t a tab)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--dtype",
        choices=MODEL_DTYPES,
        default="auto",
        help="weights' precision (auto: as saved, float32)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from lm.checkpoint import load_checkpoint
    from lm.device import pick_device, pick_dtype
    from lm.engine import SamplingParams
    from lm.fewshot import DEFAULT_TEMPLATE, build_prompt, load_examples, parse_example
    from lm.generate import Generator

    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    stop = list(args.stop or [])
    examples = [parse_example(e) for e in args.example or []]
    if args.examples:
        examples += load_examples(args.examples)
    if examples:
        prompt, default_stop = build_prompt(
            examples, prompt.strip("\n"), args.template or DEFAULT_TEMPLATE
        )
        stop = stop or default_stop
    elif args.template:
        raise LMError("--template needs few-shot examples (--example or --examples)")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=stop,
    )
    params.validate()
    device = pick_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint, device, pick_dtype(device, args.dtype))
    generator = Generator(checkpoint)
    out = sys.stdout
    if args.n == 1:
        for piece in generator.stream(prompt, params):
            out.write(piece)
            out.flush()
        out.write("\n")
        return 0
    for number, completion in enumerate(generator.complete([prompt], params, n=args.n), 1):
        out.write(f"--- sample {number} ({completion.finish_reason}) ---\n{completion.text}\n")
    return 0
