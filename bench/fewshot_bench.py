"""Few-shot accuracy of the shipped few-shot GPT and LSTM on held-out episodes.

Exact match of greedy completions, per number of shots, per category (lm.tasks.CATEGORIES:
seen tasks on held-out real words, on random strings, on inputs longer than training, and
task variants never trained on) and per task, with a plot of accuracy against shots; then,
at the largest number of shots, the same episodes written in other templates: some that a
version-3 corpus trains on and lm.tasks.HELDOUT_TEMPLATES, which no corpus holds.

    python -m bench.fewshot_bench [--episodes 200] [--shots 0,1,2,4,8] [--template-episodes 100]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import ROOT, save_result
from lm.fewshot import DEFAULT_TEMPLATE
from lm.tasks import (
    CATEGORIES,
    HELDOUT_TEMPLATES,
    accuracy_table,
    fewshot_accuracy,
    plot_accuracy,
)

# Formats a user may write: three that corpus version 3 trains on, then the held-out ones.
TEMPLATES = (
    "{input} -> {output}\n",
    "{input}: {output}\n",
    "Input: {input}\nOutput: {output}\n",
    *HELDOUT_TEMPLATES,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="fewshot-char-gpt,fewshot-char-lstm")
    parser.add_argument("--shots", default="0,1,2,4,8")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--template-episodes",
        type=int,
        default=100,
        help="episodes per category for each other template (0: skip them)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shots = [int(s) for s in args.shots.split(",")]
    results = {}
    tables = []
    for name in args.checkpoints.split(","):
        results[name] = fewshot_accuracy(name, shots, args.episodes, args.seed)
        tables.append(f"{name}\n{accuracy_table(results[name])}")
        print(tables[-1], flush=True)
    plot_accuracy(results, ROOT / "docs" / "fewshot_accuracy.png")
    table = [
        "| checkpoint | episodes | " + " | ".join(f"{s} shots" for s in shots) + " |",
        "|---|---|" + "---|" * len(shots),
    ]
    for name, result in results.items():
        for key, label in (*CATEGORIES.items(), ("overall", "all")):
            table.append(
                f"| {name} | {label} | "
                + " | ".join(f"{100 * result[s][key]:.1f}%" for s in shots)
                + " |"
            )
    most = max(shots)
    by_template: dict[str, dict[str, dict]] = {}
    template_table = [
        f"| checkpoint | template ({most} shots) | " + " | ".join(CATEGORIES) + " |",
        "|---|---|" + "---|" * len(CATEGORIES),
    ]
    for name in args.checkpoints.split(",") if args.template_episodes else []:
        by_template[name] = {DEFAULT_TEMPLATE: results[name][most]}
        for template in TEMPLATES:
            row = fewshot_accuracy(
                name, [most], args.template_episodes, args.seed, template=template
            )
            by_template[name][template] = row[most]
        for template, row in by_template[name].items():
            kind = "held out" if template in HELDOUT_TEMPLATES else "in corpus v3"
            kind = "default" if template == DEFAULT_TEMPLATE else kind
            template_table.append(
                f"| {name} | `{template!r}` ({kind}) | "
                + " | ".join(f"{100 * row[c]:.1f}%" for c in CATEGORIES)
                + " |"
            )
        print("\n".join(template_table), flush=True)
    command = (
        f"python -m bench.fewshot_bench --episodes {args.episodes} --shots {args.shots} "
        f"--template-episodes {args.template_episodes}"
    )
    save_result(
        "fewshot",
        {
            "command": command,
            "categories": CATEGORIES,
            "results": {n: {str(k): v for k, v in r.items()} for n, r in results.items()},
            "templates": by_template,
            "table": "\n".join(table)
            + (
                f"\n\nOther templates ({args.template_episodes} episodes a category; the "
                "default row is the table's above):\n\n" + "\n".join(template_table)
                if by_template
                else ""
            )
            + "\n\nPer task (exact match, %):\n\n```\n"
            + "\n\n".join(tables)
            + "\n```",
        },
    )


if __name__ == "__main__":
    main()
