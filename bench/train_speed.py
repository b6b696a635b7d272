"""Training throughput of the shipped char GPT's shape (6 layers x 192, batch 32 x block 128,
2 threads): float32 vs bfloat16 autocast vs torch.compile, classic and modern blocks, and
the hashed dropout kernel (lm/native/dropout.c) against PyTorch's dropout (`-torch-dropout`
variants run with the kernel turned off).

Each variant runs the same steps from the same seed, one after another; the result is the
training tokens/s (after the first 10 steps, which include warm-up costs) and the train and
validation loss at the last step, so a faster variant that harms the curve shows it.

    python -m bench.train_speed [--steps 40] [--threads 2] [--variants float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from bench.common import corpus_path, environment, save_result
from lm.native import dropout as hashed
from lm.train import TrainConfig, Trainer

SHAPE = dict(
    model="gpt",
    tokenizer="char",
    n_layer=6,
    n_head=6,
    n_embd=192,
    block_size=128,
    batch_size=32,
    dropout=0.1,
    lr=2e-3,
    min_lr=1e-4,
    warmup_steps=20,
)
MODERN = dict(
    position="rope",
    norm="rmsnorm",
    qk_norm=True,
    mlp="swiglu",
    tie_embeddings=False,
    zero_init_proj=True,
    optimizer="muon",
)
VARIANTS = {
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "compile": {"dtype": "float32", "compile": True},
    "compile-bfloat16": {"dtype": "bfloat16", "compile": True},
    "modern-float32": {**MODERN, "dtype": "float32"},
    "modern-bfloat16": {**MODERN, "dtype": "bfloat16"},
    "modern-compile": {**MODERN, "dtype": "float32", "compile": True},
    "torch-dropout": {"dtype": "float32"},
    "modern-torch-dropout": {**MODERN, "dtype": "float32"},
}


@contextmanager
def dropout_kernel(on: bool):
    """The hashed dropout kernel on (as lm trains by default) or off (PyTorch's dropout)."""
    with environment("LM_NATIVE", None if on else "0", hashed._kernel):
        yield


def run(name: str, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            corpus=[str(corpus_path())],
            out=str(Path(tmp) / name),
            **SHAPE,
            **VARIANTS[name],
            max_steps=steps,
            eval_interval=steps,
            eval_tokens=16384,
            threads=threads,
            seed=1337,
        )
        with dropout_kernel(not name.endswith("torch-dropout")):
            trainer = Trainer(config, progress=False)
            start = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - start
        records = [
            json.loads(line)
            for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()
        ]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    rates = rates[1:] or rates  # the first window holds start-up costs
    train = [r["train_loss"] for r in records if "train_loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    return {
        "variant": name,
        "steps": steps,
        "tokens_per_s": round(sum(rates) / len(rates)),
        "train_loss": round(train[-1], 4),
        "val_loss": round(val[-1], 4),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variants",
        default="torch-dropout,float32,modern-torch-dropout,modern-float32,modern-compile",
    )
    args = parser.parse_args()
    rows = []
    for name in args.variants.split(","):
        rows.append(run(name, args.steps, args.threads))
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"written {save_result('train_speed', {'steps': args.steps, 'threads': args.threads, 'rows': rows})}"
    )


if __name__ == "__main__":
    main()
