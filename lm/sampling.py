"""Logits -> next token ids, one row per request, each row with its own parameters.

Pure tensor functions: temperature (0 is greedy), top-k and top-p. Each row also brings
its own uniform random number (drawn from the request's own seeded generator), so a
request draws the same tokens whatever else shares its batch, and the whole batch is
sampled at once by inverting each row's cumulative distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    """Per-row parameters as tensors of shape [B]."""

    temperature: torch.Tensor  # float; 0 means greedy
    top_k: torch.Tensor  # long; 0 means off
    top_p: torch.Tensor  # float in (0, 1]; 1 means off
    uniform: torch.Tensor  # float64 in [0, 1): this row's random draw for this token


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Draw one token id per row of `logits[B, V]`."""
    logits = logits.float()
    greedy_rows = params.temperature <= 0
    temperature = torch.where(greedy_rows, torch.ones_like(params.temperature), params.temperature)
    # Shift each row so its largest logit is 0: dividing by a tiny temperature then gives
    # -inf at worst, never inf (whose softmax would be NaN and pick an arbitrary token).
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature[:, None]
    use_top_k = bool((params.top_k > 0).any())
    use_top_p = bool((params.top_p < 1.0).any())
    if use_top_k or use_top_p:
        # Decide what to drop in sorted order, but sample in vocabulary order: a row's token
        # then does not depend on whether another row in the batch asked for top-k or top-p.
        ranked, order = scaled.sort(dim=-1, descending=True)
        drop = torch.zeros_like(ranked, dtype=torch.bool)
        if use_top_k:
            ranks = torch.arange(ranked.shape[-1], device=ranked.device)
            k = torch.where(params.top_k > 0, params.top_k, ranked.shape[-1])
            drop |= ranks[None, :] >= k[:, None]
        if use_top_p:
            probs = torch.softmax(ranked.masked_fill(drop, float("-inf")), dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
            drop |= before >= params.top_p[:, None]
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    cdf = torch.cumsum(probs.double(), dim=-1)
    u = params.uniform.to(cdf.device) * cdf[:, -1]
    # right=True: the first index whose cdf exceeds u, so never a token of zero probability.
    tokens = torch.searchsorted(cdf, u[:, None], right=True)
    tokens = tokens.clamp_(max=scaled.shape[-1] - 1).squeeze(1)
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
