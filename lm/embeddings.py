"""Embeddings from a model: a token's nearest neighbours among the input embeddings, and
the mean hidden state of a text (for an embeddings endpoint)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lm.checkpoint import Checkpoint, load_checkpoint
from lm.errors import LMError


@dataclass(frozen=True)
class Neighbor:
    rank: int
    token_id: int
    token: str
    similarity: float


def nearest_tokens(checkpoint: Checkpoint | str | Path, token: str, k: int = 10) -> list[Neighbor]:
    """The `k` tokens whose input embeddings (`model.wte`) have the highest cosine
    similarity to `token`'s; the token itself comes first."""
    if k < 1:
        raise LMError(f"k must be at least 1, got {k}")
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint)
    tokenizer = checkpoint.tokenizer
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise LMError(
            f"token {token!r} is not in the vocabulary of {checkpoint.name} "
            f"({tokenizer.vocab_size} {tokenizer.kind} tokens)"
        )
    wte = getattr(checkpoint.model, "wte", None)
    if not isinstance(wte, torch.nn.Embedding):
        raise LMError(f"{checkpoint.name}: the model has no input embedding (wte)")
    with torch.no_grad():
        unit = F.normalize(wte.weight[: tokenizer.vocab_size].float().cpu(), dim=1)
        similarity = unit @ unit[token_id]
    order_key = similarity.clone()
    order_key[token_id] = float("inf")  # itself first, even if a near-twin rounds higher
    top = order_key.topk(min(k, len(order_key))).indices.tolist()
    return [
        Neighbor(rank, i, tokenizer.id_to_token(i), similarity[i].item())
        for rank, i in enumerate(top, 1)
    ]


def mean_hidden_embedding(
    model: torch.nn.Module, ids_batch: Sequence[Sequence[int]] | torch.Tensor
) -> torch.Tensor:
    """One vector per sequence: the mean of `model.hidden(ids)` over its tokens, [B, n_embd].

    Sequences may differ in length (they are right-padded, which a causal model never
    sees). A model with a context limit (GPT) embeds the last `context_size` tokens.
    """
    sequences = [s.tolist() if isinstance(s, torch.Tensor) else list(s) for s in ids_batch]
    if not sequences:
        raise LMError("nothing to embed: no inputs")
    if any(not s for s in sequences):
        raise LMError("cannot embed an empty input")
    context = getattr(model, "context_size", None)
    if context is not None:
        sequences = [s[-context:] for s in sequences]
    lengths = torch.tensor([len(s) for s in sequences])
    padded = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
    for row, s in enumerate(sequences):
        padded[row, : len(s)] = torch.tensor(s, dtype=torch.long)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = model.hidden(padded.to(device)).float().cpu()
    finally:
        model.train(was_training)
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    return (hidden * mask[..., None]).sum(dim=1) / lengths[:, None]
