"""Training: lm's trainer vs a plain PyTorch loop, and one row per model kind.

Part 1, the nanoGPT CPU recipe on Tiny Shakespeare (char GPT, 4 layers, 4 heads, 128 wide,
block 64, batch 12, 2000 steps, lr 1e-3 -> 1e-4, warm-up 100): validation loss and training
tokens/s of `lm train` beside a plain PyTorch loop of the same dimensions and batches
(nanoGPT's model code reduced to the essentials), in the same run; then lm with a tuned
recipe given the plain loop's wall-clock time.

Part 2, RNN, GRU, LSTM and GPT at about the same parameter count (~0.8M) and the same time
budget each: validation loss and bits per character.

    python -m bench.train_bench [--steps 2000] [--budget 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import corpus_path, save_result
from lm.data import random_windows, split_text, to_tensor
from lm.evaluate import evaluate
from lm.tokenizers import CharTokenizer
from lm.train import TrainConfig, Trainer

# -- a plain PyTorch GPT and loop (the baseline) ------------------------------------------


class PlainBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )

    def forward(self, x):
        batch, time_, channels = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(channels, dim=2)
        q, k, v = (t.view(batch, time_, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(batch, time_, channels))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[PlainBlock(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.wte.weight
        for module in self.modules():  # GPT-2 initialisation, as nanoGPT does
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        return self.head(self.ln_f(self.blocks(x)))


def plain_loop(train_ids, val_ids, vocab_size, steps, lr, seed=1337):
    torch.manual_seed(seed)
    model = PlainGPT(vocab_size, 64, 4, 4, 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        warm = lr * (step + 1) / 100
        progress = (step - 100) / max(1, steps - 100)
        for group in optimizer.param_groups:
            group["lr"] = (
                warm
                if step < 100
                else lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - lr / 10)
            )
        x, y = random_windows(train_ids, 64, 12, generator)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    elapsed = time.perf_counter() - start
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        n = (len(val_ids) - 1) // 64
        xs = val_ids[: n * 64].view(n, 64)
        ys = val_ids[1 : n * 64 + 1].view(n, 64)
        for i in range(0, n, 64):
            logits = model(xs[i : i + 64])
            total += F.cross_entropy(
                logits.flatten(0, 1), ys[i : i + 64].flatten(), reduction="sum"
            ).item()
            count += ys[i : i + 64].numel()
    return {
        "val_loss": total / count,
        "seconds": elapsed,
        "tokens_per_s": steps * 64 * 12 / elapsed,
    }


# -- lm's trainer ------------------------------------------------------------------------


def lm_run(corpus: Path, out: Path, **settings) -> dict:
    config = TrainConfig(corpus=[str(corpus)], out=str(out), eval_interval=10**9, **settings)
    trainer = Trainer(config, progress=False)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    steps = config.max_steps
    tokens = steps * config.batch_size * config.block_size
    result = evaluate(trainer.model, trainer.val_ids, trainer.val_chars)
    train_seconds = trainer.elapsed - trainer.eval_seconds
    return {
        "val_loss": result["loss"],
        "val_bpc": result["bpc"],
        "seconds": elapsed,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens / train_seconds,
        "params": trainer.model.num_params(),
        "steps": steps,
    }


def steps_for_budget(corpus: Path, budget: float, **settings) -> int:
    """Measure a few steps to pick how many fit in `budget` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = dict(settings, max_steps=10**6, eval_interval=10**9)
        config = TrainConfig(corpus=[str(corpus)], out=tmp, **settings)
        trainer = Trainer(config, progress=False)
        trainer.train(stop_at=5)  # warm-up
        start = time.perf_counter()
        trainer.train(stop_at=15)
        per_step = (time.perf_counter() - start) / 10
    return max(20, int(budget / per_step))


KINDS = {  # about 0.8M parameters each with a 66-character vocabulary
    "rnn": {"model": "rnn", "n_layer": 2, "n_embd": 448, "block_size": 64, "lr": 1e-3},
    "gru": {"model": "gru", "n_layer": 2, "n_embd": 256, "block_size": 64, "lr": 3e-3},
    "lstm": {"model": "lstm", "n_layer": 2, "n_embd": 224, "block_size": 64, "lr": 3e-3},
    "gpt": {"model": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "lr": 2e-3},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per model kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-kinds", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    corpus = corpus_path()
    text = corpus.read_text(encoding="utf-8")
    train_text, val_text = split_text(text)
    tokenizer = CharTokenizer.train(train_text)
    train_ids, val_ids = (
        to_tensor(tokenizer.encode(train_text)),
        to_tensor(tokenizer.encode(val_text)),
    )

    reference = {
        "tokenizer": "char",
        "model": "gpt",
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "block_size": 64,
        "batch_size": 12,
        "lr": 1e-3,
        "warmup_steps": 100,
        "max_steps": args.steps,
        "threads": args.threads,
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["plain_pytorch"] = plain_loop(
            train_ids, val_ids, tokenizer.vocab_size, args.steps, 1e-3
        )
        print("plain", rows["plain_pytorch"], flush=True)
        rows["lm_same_recipe"] = lm_run(corpus, Path(tmp) / "same", **reference)
        print("lm", rows["lm_same_recipe"], flush=True)
        # Same wall-clock as the plain loop, better recipe: higher peak learning rate and
        # larger batches of the same windows.
        tuned = dict(reference, lr=3e-3, batch_size=24, warmup_steps=50)
        tuned["max_steps"] = steps_for_budget(
            corpus,
            rows["plain_pytorch"]["seconds"],
            **{k: v for k, v in tuned.items() if k != "max_steps"},
        )
        rows["lm_tuned_same_time"] = lm_run(corpus, Path(tmp) / "tuned", **tuned)
        rows["lm_tuned_same_time"]["recipe"] = tuned
        print("lm tuned", rows["lm_tuned_same_time"], flush=True)
        kinds = {}
        if not args.skip_kinds:
            for kind, settings in KINDS.items():
                common = {
                    "tokenizer": "char",
                    "batch_size": 32,
                    "warmup_steps": 20,
                    "threads": args.threads,
                    **settings,
                }
                steps = steps_for_budget(corpus, args.budget, **common)
                kinds[kind] = lm_run(corpus, Path(tmp) / kind, max_steps=steps, **common)
                kinds[kind]["settings"] = common
                print(kind, kinds[kind], flush=True)
    save_result(
        "train",
        {
            "command": f"python -m bench.train_bench --steps {args.steps} --budget {args.budget} "
            f"--threads {args.threads}",
            "reference": reference,
            "rows": rows,
            "kinds": kinds,
            "throughput_ratio_lm_vs_plain": rows["lm_same_recipe"]["tokens_per_s"]
            / rows["plain_pytorch"]["tokens_per_s"],
        },
    )


if __name__ == "__main__":
    main()
