"""Few-shot accuracy of the shipped few-shot GPT and LSTM on held-out episodes.

Exact match of greedy completions, per number of shots, per category (lm.tasks.CATEGORIES:
seen tasks on held-out real words, on random strings, on inputs longer than training, and
task variants never trained on) and per task, with a plot of accuracy against shots.

    python -m bench.fewshot_bench [--episodes 200] [--shots 0,1,2,4,8]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import ROOT, save_result
from lm.tasks import CATEGORIES, accuracy_table, fewshot_accuracy, plot_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="fewshot-char-gpt,fewshot-char-lstm")
    parser.add_argument("--shots", default="0,1,2,4,8")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
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
    save_result(
        "fewshot",
        {
            "command": f"python -m bench.fewshot_bench --episodes {args.episodes} --shots {args.shots}",
            "categories": CATEGORIES,
            "results": {n: {str(k): v for k, v in r.items()} for n, r in results.items()},
            "table": "\n".join(table)
            + "\n\nPer task (exact match, %):\n\n```\n"
            + "\n\n".join(tables)
            + "\n```",
        },
    )


if __name__ == "__main__":
    main()
