"""Evaluation: mean next-token loss, perplexity and bits per character of a model.

Used by the trainer (periodic and final validation), `lm eval`, the shipped-checkpoint
tests and the benchmarks, so every number comes from the same code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lm.data import IGNORE, TokenArray, as_long, eval_windows, masked
from lm.errors import LMError


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    ids: TokenArray,
    n_chars: int,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    mask: np.ndarray | None = None,
) -> dict:
    """Mean next-token loss over `ids` (deterministic), with perplexity and bits per character.

    GPT: non-overlapping windows of its context. Recurrent models: parallel contiguous
    streams with the hidden state carried along. With a loss `mask` (one 0/1 per token,
    `lm.data.read_loss_mask`), only the targets it marks count.
    """
    was_training = model.training
    model.eval()
    chars_per_token = n_chars / max(1, len(ids))
    if max_tokens is not None and len(ids) > max_tokens + 1:
        ids = ids[: max_tokens + 1]
        mask = None if mask is None else mask[: max_tokens + 1]
    config = model.config
    total_loss, total_tokens = 0.0, 0
    if config.kind == "gpt":
        block = min(config.block_size, len(ids) - 1)
        batches = eval_windows(ids, block, batch_size=16, mask=mask)
        for x, y in batches:
            logits = model(x.to(device))
            total_loss += F.cross_entropy(
                logits.flatten(0, 1).float(),
                y.to(device).flatten(),
                reduction="sum",
                ignore_index=IGNORE,
            ).item()
            total_tokens += int((y != IGNORE).sum())
    else:
        n_streams = max(1, min(16, (len(ids) - 1) // (4 * config.block_size)))
        length = (len(ids) - 1) // n_streams
        xs = ids[: length * n_streams].reshape(n_streams, length)  # views, also of a token file
        ys = ids[1 : length * n_streams + 1].reshape(n_streams, length)
        if mask is not None:
            mask = mask[1 : length * n_streams + 1].reshape(n_streams, length)
        state = None
        for start in range(0, length, config.block_size):
            x = as_long(xs[:, start : start + config.block_size]).to(device)
            y = as_long(ys[:, start : start + config.block_size])
            if mask is not None:
                y = masked(y, mask[:, start : start + config.block_size])
            logits, state = model(x, state, return_state=True)
            total_loss += F.cross_entropy(
                logits.flatten(0, 1).float(),
                y.to(device).flatten(),
                reduction="sum",
                ignore_index=IGNORE,
            ).item()
            total_tokens += int((y != IGNORE).sum())
    model.train(was_training)
    if total_tokens == 0:
        if mask is not None:
            raise LMError("the loss mask marks no target in the validation split")
        raise LMError("validation split is empty: the corpus is too short")
    loss = total_loss / total_tokens
    covered_chars = chars_per_token * total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bpc": total_loss / covered_chars / math.log(2),
        "tokens": total_tokens,
    }


def evaluate_checkpoint(
    checkpoint: str,
    corpus: list[str],
    split: str = "val",
    val_fraction: float | None = None,
    max_tokens: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    loss_mask: list[str] | None = None,
) -> dict:
    """The one evaluation used by `lm eval`, the shipped-checkpoint test and the benchmarks.
    `loss_mask`: score only the characters these files mark (`lm.data.read_loss_mask`)."""
    from lm.checkpoint import load_checkpoint
    from lm.data import read_corpus, read_loss_mask, split_text, to_tensor
    from lm.device import pick_device, pick_dtype

    torch_device = pick_device(device)
    ckpt = load_checkpoint(checkpoint, torch_device, pick_dtype(torch_device, dtype))
    text = read_corpus(corpus)
    mask = None
    if loss_mask:
        if ckpt.tokenizer.kind != "char":
            raise LMError("--loss-mask marks characters: it needs a char-tokenizer checkpoint")
        mask = read_loss_mask(loss_mask, corpus)
    if split == "val":
        fraction = val_fraction or ckpt.training.get("val_fraction", 0.1)
        train_text, text = split_text(text, fraction)
        mask = None if mask is None else mask[len(train_text) :]
    ids = to_tensor(ckpt.tokenizer.encode(text))
    if len(ids) < 2:
        raise LMError("the evaluation text is shorter than two tokens")
    return evaluate(ckpt.model, ids, len(text), max_tokens, torch_device, mask)
