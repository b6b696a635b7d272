"""Logits -> next token ids, one row per request, each row with its own parameters.

Pure tensor functions: temperature (0 is greedy), top-k, top-p and per-row seeds. The
random number for row b is a hash of (seed_b, counter_b), so a request draws the same
tokens whatever else shares its batch, and the whole batch is sampled without a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _pcg_hash(x: torch.Tensor) -> torch.Tensor:
    """PCG-style 32-bit integer hash on int64 tensors (values stay below 2**63)."""
    state = (x * 747796405 + 2891336453) & _MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _MASK32
    return ((word >> 22) ^ word) & _MASK32


def uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """A uniform number in [0, 1) for each (seed, counter) pair, float64."""
    low = seeds & _MASK32
    high = (seeds >> 32) & _MASK32
    h = _pcg_hash(_pcg_hash(low ^ _pcg_hash(high)) ^ counters)
    h2 = _pcg_hash(h ^ 0x9E3779B9)
    return (h.double() * 2.0**21 + (h2 >> 11).double()) / 2.0**53  # 53 random bits


@dataclass
class SamplingBatch:
    """Per-row parameters as tensors of shape [B]."""

    temperature: torch.Tensor  # float; 0 means greedy
    top_k: torch.Tensor  # long; 0 means off
    top_p: torch.Tensor  # float in (0, 1]; 1 means off
    seed: torch.Tensor  # long
    counter: torch.Tensor  # long: how many tokens this row has drawn so far


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Draw one token id per row of `logits[B, V]`."""
    logits = logits.float()
    greedy_rows = params.temperature <= 0
    temperature = torch.where(greedy_rows, torch.ones_like(params.temperature), params.temperature)
    scaled = logits / temperature[:, None]
    use_top_k = bool((params.top_k > 0).any())
    use_top_p = bool((params.top_p < 1.0).any())
    if use_top_k or use_top_p:
        scaled, order = scaled.sort(dim=-1, descending=True)
        if use_top_k:
            ranks = torch.arange(scaled.shape[-1], device=scaled.device)
            k = torch.where(params.top_k > 0, params.top_k, scaled.shape[-1])
            scaled = scaled.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
        if use_top_p:
            probs = torch.softmax(scaled, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
            scaled = scaled.masked_fill(before >= params.top_p[:, None], float("-inf"))
    else:
        order = None
    probs = torch.softmax(scaled, dim=-1)
    cdf = torch.cumsum(probs.double(), dim=-1)
    u = uniform(params.seed, params.counter).to(cdf.device) * cdf[:, -1]
    # right=True: the first index whose cdf exceeds u, so never a token of zero probability.
    choice = torch.searchsorted(cdf, u[:, None], right=True)
    choice = choice.clamp_(max=scaled.shape[-1] - 1).squeeze(1)
    if order is not None:
        tokens = order.gather(1, choice[:, None]).squeeze(1)
    else:
        tokens = choice
    if bool(greedy_rows.any()):
        tokens = torch.where(greedy_rows, logits.argmax(dim=-1), tokens)
    return tokens


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top_k: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's distribution (temperature 1): of the chosen
    `tokens[B]`, and the `top_k` most likely tokens' values and ids ([B, top_k])."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    values, ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
    return chosen, values, ids
