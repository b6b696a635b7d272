"""`lm fewshot-eval`: exact-match accuracy on held-out few-shot episodes, per number of shots."""

from __future__ import annotations

import json

from lm.commands._args import escaped, positive_int, shots_list


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "fewshot-eval",
        help="exact-match accuracy on held-out few-shot episodes",
        description="Greedy completions of held-out `lm make-tasks` "
        "episodes, scored by exact match, per number of shots, per category "
        "(held-out words, random strings, longer inputs, unseen task variants) "
        "and per task.",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="shipped name or directory (repeatable)",
    )
    p.add_argument(
        "--shots",
        type=shots_list,
        default=[0, 1, 2, 4, 8],
        help="comma-separated numbers of examples (default 0,1,2,4,8)",
    )
    p.add_argument(
        "--episodes", type=positive_int, default=200, help="per category and number of shots"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--template",
        default=None,
        type=escaped,
        help="few-shot format of the prompts (default the training one, '{input} => {output}\\n'; "
        "\\n is a line end, \\t a tab)",
    )
    p.add_argument(
        "--task",
        action="append",
        metavar="NAME",
        help="score this task instead of the standard ones (repeatable): a primitive "
        "(reverse, upper, sort, shift3, first7, ...) or steps joined by | (shift1|reverse), "
        "on held-out words, random strings and longer inputs",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--json",
        action="store_true",
        help='print {checkpoint: {shots: {"words", "random", "long", "unseen", "overall", '
        '"per_task"}}}',
    )
    p.add_argument(
        "--plot", metavar="FILE.png", help="save accuracy vs shots, a line per checkpoint"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from lm.checkpoint import load_checkpoint
    from lm.device import pick_device
    from lm.fewshot import DEFAULT_TEMPLATE, build_prompt
    from lm.tasks import accuracy_table, fewshot_accuracy, plot_accuracy, task_named

    template = DEFAULT_TEMPLATE if args.template is None else args.template
    build_prompt([], "query", template)  # a malformed template fails now, before loading
    tasks = None if args.task is None else [task_named(name) for name in args.task]

    if args.plot:  # fail before the evaluation, not after it
        from lm.plotting import pyplot

        pyplot()
    device = pick_device(args.device)
    results = {}
    for name in args.checkpoint:
        checkpoint = load_checkpoint(name, device)
        results[name] = fewshot_accuracy(
            checkpoint, args.shots, args.episodes, args.seed, template=template, tasks=tasks
        )
    if args.plot:
        plot_accuracy(results, args.plot)
    if args.json:
        print(json.dumps(results))
        return 0
    for name, result in results.items():
        print(
            f"{name}: exact match (%) on {args.episodes} held-out episodes, seed {args.seed}"
            + ("" if args.template is None else f", template {template!r}")
        )
        print(accuracy_table(result))
        print()
    if args.plot:
        print(f"plot saved to {args.plot}")
    return 0
