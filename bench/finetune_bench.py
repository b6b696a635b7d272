"""Fine-tuning on a corpus that is not Shakespeare: from scratch vs full vs LoRA.

The shipped Shakespeare char GPT adapted to data/python-reference.txt (the Python
Language Reference's topic texts, as `pydoc_data.topics` ships them with CPython). All
three runs use the parent's tokenizer and architecture, so their validation losses compare
token for token; "scratch" starts from random weights. The 7% of characters the parent's
tokenizer lacks (quotes, digits, brackets, `_`, `=`) are dropped (`--unknown drop`): mapped
to one <unk>, they would be the easiest 7% of targets for the full runs, while an adapter
cannot move the frozen <unk> embedding (see docs/FINETUNE.md). Each run gets the same training-time budget; validation loss is recorded
against steps and seconds. Writes bench/results/finetune.json and docs/finetune.png.

    python -m bench.finetune_bench [--seconds 90] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.common import RESULTS, ROOT, git_revision, machine
from lm.evaluate import evaluate
from lm.models import build_model
from lm.plotting import pyplot
from lm.train import TrainConfig, Trainer

PARENT = "shakespeare-char-gpt"
CORPUS = ROOT / "data" / "python-reference.txt"
OUT = ROOT / "bench" / "out" / "finetune"
RUNS = {  # name -> settings over the common ones
    "scratch": {"lr": 1e-3, "warmup_steps": 50},
    "full fine-tune": {"lr": 3e-4, "warmup_steps": 20},
    "LoRA r=8": {"lr": 2e-3, "warmup_steps": 20, "lora_rank": 8, "lora_alpha": 16.0},
}


def run(name: str, extra: dict, seconds: float, threads: int) -> dict:
    out = OUT / name.split()[0].lower().replace("=", "")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    config = TrainConfig.from_dict(
        {
            "corpus": [str(CORPUS)],
            "out": str(out),
            "init_from": PARENT,
            "batch_size": 8,
            "block_size": 128,
            "max_steps": 100_000,
            "max_time": seconds,
            "eval_interval": 20,
            "eval_tokens": 8192,
            "threads": threads,
            "device": "cpu",
            "dtype": "float32",
            "seed": 1,
            "unknown": "drop",
            **extra,
        }
    )
    trainer = Trainer(config, progress=False)
    if name == "scratch":  # the parent's tokenizer and shape, random weights
        torch.manual_seed(config.seed)
        trainer.model.load_state_dict(build_model(trainer.model_config).state_dict())
    start = evaluate(trainer.model, trainer.val_ids, trainer.val_chars, 8192, "cpu")
    started = time.perf_counter()
    summary = trainer.train()
    wall = time.perf_counter() - started
    curve = [{"step": 0, "elapsed_s": 0.0, "val_loss": start["loss"]}] + [
        {"step": r["step"], "elapsed_s": r["elapsed_s"], "val_loss": r["val_loss"]}
        for r in trainer.history
        if "val_loss" in r
    ]
    return {
        "name": name,
        "settings": extra,
        "trainable_params": trainer.trainable_params,
        "total_params": sum(p.numel() for p in trainer.model.parameters()),
        "steps": trainer.step,
        "train_seconds": summary["train_seconds"],
        "wall_s": round(wall, 1),
        "val_loss": summary["val_loss"],
        "val_bpc": summary["val_bpc"],
        "start_val_loss": start["loss"],
        "curve": curve,
        "checkpoint_bytes": sum(
            p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors"
        ),
    }


def plot(results: list[dict]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for result in results:
        curve = result["curve"]
        label = f"{result['name']} ({result['trainable_params']:,} trained)"
        axes[0].plot([p["step"] for p in curve], [p["val_loss"] for p in curve], "-", label=label)
        axes[1].plot(
            [p["elapsed_s"] for p in curve], [p["val_loss"] for p in curve], "-", label=label
        )
    axes[0].set_xlabel("step (8 x 128 tokens)")
    axes[1].set_xlabel("training seconds (evaluation included)")
    axes[0].set_ylabel("validation loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(top=min(4.5, max(r["start_val_loss"] for r in results) + 0.1))
    axes[1].legend()
    fig.suptitle(f"{PARENT} on the Python Language Reference: scratch vs full vs LoRA")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "finetune.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="training time per run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run(name, extra, args.seconds, args.threads) for name, extra in RUNS.items()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": machine(),
        "revision": git_revision(),
        "seconds": args.seconds,
        "threads": args.threads,
        "parent": PARENT,
        "corpus": CORPUS.name,
        "runs": results,
    }
    (RESULTS / "finetune.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(results)
    print(
        "| run | trainable params | steps | val loss at start | val loss | bits/char | "
        "weights written |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['name']} | {r['trainable_params']:,} | {r['steps']} | "
            f"{r['start_val_loss']:.3f} | {r['val_loss']:.3f} | {r['val_bpc']:.3f} | "
            f"{r['checkpoint_bytes'] / 1e6:.2f} MB |"
        )


if __name__ == "__main__":
    main()
