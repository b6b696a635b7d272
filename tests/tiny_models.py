"""Small randomly initialised models for tests that need weights with some spread, not a
trained model (imported by test modules: they do not import conftest)."""

from __future__ import annotations

from pathlib import Path

import torch

from lm.models import ModelConfig, build_model
from lm.train import TrainConfig


def random_gpt(
    vocab_size: int = 40, block_size: int = 32, seed: int = 0, **options
) -> torch.nn.Module:
    """A 2-layer, 32-wide GPT with N(0, 0.3) weights (distinct logits, unlike the default
    initialisation's near-uniform ones), in eval mode; `options` are ModelConfig fields."""
    torch.manual_seed(seed)
    config = ModelConfig(
        kind="gpt",
        vocab_size=vocab_size,
        n_layer=2,
        n_embd=32,
        n_head=2,
        block_size=block_size,
        **options,
    )
    model = build_model(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.eval()


def tiny_train_config(corpus: Path, out: Path, model: str = "gpt", **overrides) -> TrainConfig:
    """A run of a 2-layer, 32-wide char model on `corpus` in a few seconds of one CPU
    thread: 30 steps of 8 windows of 16, evaluated every 10; `overrides` are its fields."""
    settings = dict(
        corpus=[str(corpus)],
        out=str(out),
        tokenizer="char",
        model=model,
        n_layer=2,
        n_embd=32,
        n_head=2,
        block_size=16,
        batch_size=8,
        lr=1e-2,
        warmup_steps=5,
        max_steps=30,
        eval_interval=10,
        device="cpu",
        seed=7,
    )
    settings.update(overrides)
    return TrainConfig(**settings)
