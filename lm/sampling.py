"""Sampling parameters and logits -> next token ids, one row per request.

`SamplingParams` is what a request asks for, validated here against one set of limits.
`SamplingSlots` holds the per-row controls of a running batch as tensors, and `sample`
draws a whole batch at once with pure tensor code: temperature (0 is greedy), min-p, top-k
and top-p. Each row also brings its own uniform random number (drawn from the request's
own seeded generator), so a request draws the same tokens whatever else shares its batch,
and the batch is sampled by inverting each row's cumulative distribution.

A new sampling control touches only this module (a field of `SamplingParams` and of
`SamplingBatch`, its check in `validate`, its step in `sample`) and the request schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from lm.errors import LMError

MAX_STOP_SEQUENCES = 16  # the most any request may give; a server may allow fewer
MAX_TOP_LOGPROBS = 5
_INT64_MAX = (1 << 63) - 1  # a larger top_k (no limit anyway) would not fit its tensor slot


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: the library's own ceilings, or a server's lower ones."""

    max_new_tokens: int | None = None  # None: no limit
    max_stop: int = MAX_STOP_SEQUENCES
    max_stop_chars: int | None = None  # None: no limit


@dataclass
class SamplingParams:
    """How one sequence is generated."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k's

    def validate(self, limits: Limits = Limits()) -> None:
        """Raise LMError, naming the parameter, unless every value is usable and in limits."""
        if self.max_new_tokens < 1:
            raise LMError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}",
                          param="max_new_tokens")
        if limits.max_new_tokens is not None and self.max_new_tokens > limits.max_new_tokens:
            raise LMError(f"at most {limits.max_new_tokens}, got {self.max_new_tokens}",
                          param="max_new_tokens")
        if not 0 <= self.temperature < float("inf"):  # also rejects NaN
            raise LMError(f"temperature must be a finite number >= 0, got {self.temperature}",
                          param="temperature")
        if self.top_k < 0:
            raise LMError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}", param="top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise LMError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise LMError(f"min_p must be in [0, 1] (0 turns it off), got {self.min_p}",
                          param="min_p")
        max_stop = min(limits.max_stop, MAX_STOP_SEQUENCES)
        if len(self.stop) > max_stop:
            raise LMError(f"at most {max_stop} stop sequences, got {len(self.stop)}", param="stop")
        if any(not s for s in self.stop):
            raise LMError("stop sequences must not be empty", param="stop")
        if limits.max_stop_chars is not None and any(len(s) > limits.max_stop_chars
                                                     for s in self.stop):
            raise LMError(f"each stop sequence at most {limits.max_stop_chars} characters",
                          param="stop")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise LMError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, "
                          f"got {self.logprobs}", param="logprobs")


@dataclass
class SamplingBatch:
    """Per-row parameters as tensors of shape [B]; every field but `uniform` is the
    `SamplingParams` field of the same name."""

    temperature: torch.Tensor  # float; 0 means greedy
    top_k: torch.Tensor  # long; 0 means off
    top_p: torch.Tensor  # float in (0, 1]; 1 means off
    uniform: torch.Tensor  # float64 in [0, 1): this row's random draw for this token
    min_p: torch.Tensor | None = None  # float in [0, 1]; 0 (or None) means off


# The per-row controls: the SamplingBatch fields that come from SamplingParams.
CONTROLS = tuple(f.name for f in fields(SamplingBatch) if f.name != "uniform")


class SamplingSlots:
    """The per-row controls of a batch of up to `max_batch` rows, preallocated: the engine
    writes a row when a sequence joins and moves rows as it does its model state."""

    def __init__(self, max_batch: int):
        off = SamplingParams()
        self.tensors = {
            name: torch.full((max_batch,), getattr(off, name),
                             dtype=torch.long if isinstance(getattr(off, name), int)
                             else torch.float32)
            for name in CONTROLS
        }

    def set(self, row: int, params: SamplingParams) -> None:
        for name, tensor in self.tensors.items():
            value = getattr(params, name)
            tensor[row] = min(value, _INT64_MAX) if tensor.dtype == torch.long else value

    def batch(self, rows: int, uniform: torch.Tensor) -> SamplingBatch:
        """The first `rows` rows, with each row's random draw for this token."""
        return SamplingBatch(**{name: t[:rows] for name, t in self.tensors.items()},
                             uniform=uniform)


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Draw one token id per row of `logits[B, V]`."""
    logits = logits.float()
    greedy_rows = params.temperature <= 0
    temperature = torch.where(greedy_rows, torch.ones_like(params.temperature), params.temperature)
    # Shift each row so its largest logit is 0: dividing by a tiny temperature then gives
    # -inf at worst, never inf (whose softmax would be NaN and pick an arbitrary token).
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature[:, None]
    if params.min_p is not None and bool((params.min_p > 0).any()):
        # min-p (vLLM's meaning): drop tokens less likely than min_p times the top token.
        # The top token's scaled logit is 0, so a token's ratio to it is exp(scaled).
        scaled = scaled.masked_fill(scaled < params.min_p.log()[:, None], float("-inf"))
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
