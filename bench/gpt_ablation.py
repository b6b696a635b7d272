"""GPT ablation at one wall-clock budget: the classic char GPT, each modern change alone, and
all together, trained one after another in one run on Tiny Shakespeare.

Every variant gets the same `--budget` seconds of training (evaluation included) with the lr
schedule following the clock (`max_time`), so the comparison is at equal compute on this
machine. Writes bench/results/gpt_ablation.json, the validation curves as
docs/gpt_ablation.png, and prints (and writes, with --docs) a markdown table for docs/.

    python -m bench.gpt_ablation --budget 1800 [--variants all] [--threads 2] [--docs]
    python -m bench.gpt_ablation --budget 30 --eval-interval 10 --eval-tokens 2048 \
        --variants classic,muon --out-dir /tmp/ablation  # a smoke test
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.common import ROOT, corpus_path, machine, save_result
from lm.native import bf16_matmul_is_fast
from lm.train import TrainConfig, Trainer

# The shipped char GPT's shape at the new recipe's context (tokens per step as before).
BASE = dict(
    model="gpt",
    tokenizer="char",
    n_layer=6,
    n_head=6,
    n_embd=192,
    block_size=256,
    batch_size=16,
    dropout=0.1,
    attn_dropout=0.0,  # on the CPU, attention dropout leaves the fused kernel (3.7x slower)
    lr=2e-3,
    min_lr=1e-4,
    warmup_steps=200,
    eval_tokens=32768,
    seed=1337,
    max_steps=10**7,
)
QWEN3 = dict(position="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", tie_embeddings=False)
VARIANTS: dict[str, dict] = {
    "classic": {},
    "attn-dropout": {"attn_dropout": 0.1},
    "rope": {"position": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk-norm": {"qk_norm": True},
    "swiglu": {"mlp": "swiglu"},
    "relu2": {"mlp": "relu2"},
    "untied": {"tie_embeddings": False},
    "zero-init": {"zero_init_proj": True},
    "softcap": {"logit_softcap": 30.0},
    "muon": {"optimizer": "muon"},
    "warmdown": {"schedule": "warmdown", "warmdown_frac": 0.4},
    "bfloat16": {"dtype": "best"},
    "all (Qwen3 blocks)": {
        **QWEN3,
        "zero_init_proj": True,
        "optimizer": "muon",
        "schedule": "warmdown",
        "warmdown_frac": 0.4,
        "dtype": "best",
    },
    "all + relu2 + softcap": {
        **QWEN3,
        "mlp": "relu2",
        "logit_softcap": 30.0,
        "zero_init_proj": True,
        "optimizer": "muon",
        "schedule": "warmdown",
        "warmdown_frac": 0.4,
        "dtype": "best",
    },
}


def run_variant(name: str, budget: float, args: argparse.Namespace, workdir: Path) -> dict:
    settings = {**BASE, **VARIANTS[name], "eval_tokens": args.eval_tokens}
    settings.pop("warmup_steps")
    config = TrainConfig(
        corpus=[str(corpus_path())],
        out=str(workdir / name.replace(" ", "_")),
        **settings,
        max_time=budget,
        eval_interval=args.eval_interval,
        warmup_steps=args.warmup_steps,
        threads=args.threads,
    )
    summary = Trainer(config, progress=False).train()
    records = [
        json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()
    ]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    rates = rates[1:] or rates  # the first window holds start-up costs
    return {
        "variant": name,
        "settings": VARIANTS[name],
        "steps": summary["step"],
        "train_seconds": summary["train_seconds"],
        "tokens_per_s": round(sum(rates) / len(rates)),
        "val_loss": round(summary["val_loss"], 4),  # best checkpoint, whole validation split
        "val_bpc": round(summary["val_bpc"], 4),
        "curve": [
            (round(r["elapsed_s"], 1), round(r["val_loss"], 4)) for r in records if "val_loss" in r
        ],
    }


def markdown(rows: list[dict], budget: float, flags: str = "") -> str:
    baseline = rows[0]["val_loss"] if rows and rows[0]["variant"] == "classic" else None
    lines = [
        f"GPT ablation: 6 layers x 192, context 256, batch 16, {budget:.0f} s of "
        f"training each on {machine()} (`python -m bench.gpt_ablation --budget "
        f"{budget:.0f} {flags}`). Validation loss of the best checkpoint on the whole split.",
        "",
        "| variant | steps | tokens/s | val loss | vs classic | bits/char |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        delta = "" if baseline is None else f"{row['val_loss'] - baseline:+.4f}"
        lines.append(
            f"| {row['variant']} | {row['steps']:,} | {row['tokens_per_s']:,} | "
            f"{row['val_loss']:.4f} | {delta} | {row['val_bpc']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for row in rows:
        if row["curve"]:
            style = "o-" if row["variant"].startswith(("all", "classic")) else ".--"
            ax.plot(
                *zip(*row["curve"]),
                style,
                markersize=3,
                label=f"{row['variant']} ({row['val_loss']:.3f})",
            )
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("char GPT on Tiny Shakespeare, one wall-clock budget per variant")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, required=True, help="seconds per variant")
    parser.add_argument(
        "--variants", default="all", help=f"comma-separated, or all: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--warmup-steps", type=int, default=200, help="lr warm-up (short budgets: fewer)"
    )
    parser.add_argument("--eval-interval", type=int, default=250, help="steps between evals")
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=32768,
        help="validation tokens per periodic eval (the final one: all)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="write the JSON, picture and table here instead of bench/results "
        "and docs/ (for smoke tests)",
    )
    parser.add_argument("--docs", action="store_true", help="also write docs/gpt_ablation.md")
    args = parser.parse_args()
    if args.variants == "all":  # bfloat16 only where the CPU multiplies it in hardware
        names = [n for n in VARIANTS if n != "bfloat16" or bf16_matmul_is_fast()]
    else:
        names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(run_variant(name, args.budget, args, Path(tmp)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    flags = f"--warmup-steps {args.warmup_steps} --eval-interval {args.eval_interval}"
    table = markdown(rows, args.budget, flags)
    result = {"budget_s": args.budget, "threads": args.threads, "base": BASE, "rows": rows}
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "gpt_ablation.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(rows, args.out_dir / "gpt_ablation.png")
        (args.out_dir / "gpt_ablation.md").write_text(table)
    else:
        save_result("gpt_ablation", result)
        plot(rows, ROOT / "docs" / "gpt_ablation.png")
        if args.docs:
            (ROOT / "docs" / "gpt_ablation.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
