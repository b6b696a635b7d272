"""`lm make-tasks`: write an in-context-learning corpus of few-shot episodes."""

from __future__ import annotations

from lm.commands._args import positive_int

VERSIONS = (2, 3, 4, 5, 6, 7)  # lm.tasks.CORPUS_VERSIONS (not imported: the CLI starts fast)
DEFAULT_VERSION = 5  # lm.tasks.LATEST_VERSION


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "make-tasks",
        help="write an in-context-learning corpus of few-shot episodes",
        description="Episodes of `input => output` lines (version 3 on: each episode "
        "in one of several templates; 4 on: compositions drawn by pair of task "
        "families), "
        "one random string task each, blank-line separated; held-out words never appear.",
    )
    p.add_argument("--out", required=True, help="text file to write (UTF-8)")
    p.add_argument("--episodes", type=positive_int, default=20_000)
    p.add_argument("--seed", type=int, default=0, help="same seed, same corpus")
    p.add_argument(
        "--version",
        type=int,
        choices=VERSIONS,
        default=DEFAULT_VERSION,
        help="corpus format: 7 is 6 with each primitive's family drawn by the square root of "
        "its number of tasks (shift by k most often); "
        "6 is 5 with each composed step's parameter drawn by Zipf rank "
        "(shift by 1 most often); 5 (default, the shipped few-shot GPT's) is 4 with each "
        "pair of task families weighted by "
        "the square root of its number of tasks; 4 is 3 with every pair of task families "
        "composed equally often; 3 mixes templates and punctuation; 2 is the `input => output` "
        "corpus of letters and digits",
    )
    p.add_argument(
        "--mask",
        metavar="PATH",
        help="also write the answer mask here: one byte per character of the corpus, 1 "
        "on each answer and its line end, 0 elsewhere (for lm train --loss-mask)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from lm.tasks import write_corpus

    text = write_corpus(args.out, args.episodes, args.seed, args.version, args.mask)
    print(
        f"wrote {args.episodes:,} episodes ({len(text):,} characters, "
        f"version {args.version}) to {args.out}"
        + (f", and their answer mask to {args.mask}" if args.mask else "")
    )
    return 0
