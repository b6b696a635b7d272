"""Sampling parameters and logits -> next token ids, one row per request.

`SamplingParams` is what a request asks for, validated here against one set of limits.
`SamplingSlots` holds the per-row controls of a running batch as tensors, and `sample`
draws a whole batch at once with pure tensor code: temperature (0 is greedy), min-p, top-k
and top-p, after logit biases and the repetition, frequency and presence penalties (vLLM's
meanings; they read per-row token counts that the slots keep up to date). Each row also brings its own uniform random number (drawn from the request's
own seeded generator), so a request draws the same tokens whatever else shares its batch,
and the batch is sampled by inverting each row's cumulative distribution.

A new sampling control touches only this module (a field of `SamplingParams` and of
`SamplingBatch`, its check in `validate`, its step in `sample`) and the request schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lm.errors import LMError
from lm.native.decode import draw

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

    max_new_tokens: int = 256  # 0: only score the prompt (with prompt_logprobs)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0  # subtracted once from every generated token's logit
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides (or multiplies) prompt and generated tokens' logits
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k's
    prompt_logprobs: int | None = None  # the same for every prompt token (the first: None)

    def validate(self, limits: Limits = Limits()) -> None:
        """Raise LMError, naming the parameter, unless every value is usable and in limits."""
        if self.max_new_tokens < 0 or (self.max_new_tokens == 0 and self.prompt_logprobs is None):
            raise LMError(
                f"max_new_tokens must be at least 1 (0 only when scoring the prompt), "
                f"got {self.max_new_tokens}",
                param="max_new_tokens",
            )
        if limits.max_new_tokens is not None and self.max_new_tokens > limits.max_new_tokens:
            raise LMError(
                f"at most {limits.max_new_tokens}, got {self.max_new_tokens}",
                param="max_new_tokens",
            )
        if not 0 <= self.temperature < float("inf"):  # also rejects NaN
            raise LMError(
                f"temperature must be a finite number >= 0, got {self.temperature}",
                param="temperature",
            )
        if self.top_k < 0:
            raise LMError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}", param="top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise LMError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise LMError(
                f"min_p must be in [0, 1] (0 turns it off), got {self.min_p}", param="min_p"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise LMError(f"{name} must be in [-2, 2], got {getattr(self, name)}", param=name)
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise LMError(
                f"repetition_penalty must be in (0, 10] (1 turns it off), "
                f"got {self.repetition_penalty}",
                param="repetition_penalty",
            )
        for token_id, bias in self.logit_bias.items():
            if token_id < 0 or not -100.0 <= bias <= 100.0:
                raise LMError(
                    f"logit_bias: token ids must be >= 0 and biases in [-100, 100], "
                    f"got {token_id}: {bias}",
                    param="logit_bias",
                )
        max_stop = min(limits.max_stop, MAX_STOP_SEQUENCES)
        if len(self.stop) > max_stop:
            raise LMError(f"at most {max_stop} stop sequences, got {len(self.stop)}", param="stop")
        if any(not s for s in self.stop):
            raise LMError("stop sequences must not be empty", param="stop")
        if limits.max_stop_chars is not None and any(
            len(s) > limits.max_stop_chars for s in self.stop
        ):
            raise LMError(
                f"each stop sequence at most {limits.max_stop_chars} characters", param="stop"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise LMError(
                f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}",
                param="logprobs",
            )
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise LMError(
                f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, "
                f"got {self.prompt_logprobs}",
                param="prompt_logprobs",
            )

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the row's token counts."""
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
        )

    @property
    def temperature_only(self) -> bool:
        """Whether a token is drawn from the logits by the temperature alone: no penalty,
        logit bias, top-k, top-p or min-p (`sample` then comes down to the compiled draw)."""
        return not (
            self.penalized or self.logit_bias or self.top_k or self.top_p < 1.0 or self.min_p > 0.0
        )


@dataclass
class SamplingBatch:
    """Per-row parameters as tensors of shape [B]; every field but `uniform` is the
    `SamplingParams` field of the same name."""

    temperature: torch.Tensor  # float; 0 means greedy
    top_k: torch.Tensor  # long; 0 means off
    top_p: torch.Tensor  # float in (0, 1]; 1 means off
    uniform: torch.Tensor  # float64 in [0, 1): this row's random draw for this token
    min_p: torch.Tensor | None = None  # float in [0, 1]; 0 (or None) means off
    presence_penalty: torch.Tensor | None = None  # float; 0 means off
    frequency_penalty: torch.Tensor | None = None  # float; 0 means off
    repetition_penalty: torch.Tensor | None = None  # float > 0; 1 means off
    extras: torch.Tensor | None = None  # bool: the row has a logit bias or a penalty
    biased: torch.Tensor | None = None  # bool: the row has a logit bias
    logit_bias: torch.Tensor | None = None  # [B, V] float: added to the logits
    counts: torch.Tensor | None = None  # [B, V] int: each token's count in the generated ids
    in_prompt: torch.Tensor | None = None  # [B, V] bool: the token occurs in the prompt


# The per-row scalar controls: the SamplingBatch fields that come from SamplingParams.
CONTROLS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


class SamplingSlots:
    """The per-row controls of a batch of up to `max_batch` rows, preallocated: the engine
    writes a row when a sequence joins and moves rows as it does its model state. With a
    `vocab_size`, rows also keep their token counts (for penalties) and logit biases."""

    def __init__(self, max_batch: int, vocab_size: int = 0, device: torch.device | str = "cpu"):
        off = SamplingParams()
        self.tensors = {
            name: torch.full(
                (max_batch,),
                getattr(off, name),
                device=device,
                dtype=torch.long if isinstance(getattr(off, name), int) else torch.float32,
            )
            for name in CONTROLS
        }
        self.vocab_size = vocab_size
        if vocab_size:
            self.tensors["extras"] = torch.zeros(max_batch, dtype=torch.bool, device=device)
            self.tensors["biased"] = torch.zeros(max_batch, dtype=torch.bool, device=device)
            self.tensors["logit_bias"] = torch.zeros(max_batch, vocab_size, device=device)
            self.tensors["counts"] = torch.zeros(
                max_batch, vocab_size, dtype=torch.int32, device=device
            )
            self.tensors["in_prompt"] = torch.zeros(
                max_batch, vocab_size, dtype=torch.bool, device=device
            )

    def set(
        self,
        row: int,
        params: SamplingParams,
        prompt_ids: list[int] = (),
        generated: list[int] = (),
    ) -> None:
        """Write row `row` for a sequence joining the batch (its ids so far, for penalties)."""
        for name in CONTROLS:
            tensor, value = self.tensors[name], getattr(params, name)
            tensor[row] = min(value, _INT64_MAX) if tensor.dtype == torch.long else value
        if not self.vocab_size:
            if params.penalized or params.logit_bias:
                raise LMError("penalties and logit_bias need the vocabulary size")
            return
        self.tensors["extras"][row] = bool(params.logit_bias) or params.penalized
        self.tensors["biased"][row] = bool(params.logit_bias)
        bias = self.tensors["logit_bias"][row]
        bias.zero_()
        for token_id, value in params.logit_bias.items():
            bias[token_id] = value
        counts, in_prompt = self.tensors["counts"][row], self.tensors["in_prompt"][row]
        counts.zero_()
        in_prompt.zero_()
        if params.penalized:  # rows without penalties never read their counts
            device = counts.device
            in_prompt[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True
            if generated:
                counts.index_add_(
                    0,
                    torch.tensor(list(generated), device=device),
                    torch.ones(len(generated), dtype=counts.dtype, device=device),
                )

    def record(self, tokens: torch.Tensor) -> None:
        """Count each row's newly sampled token (rows 0..len(tokens)-1), when any row has
        a penalty (the others never read their counts)."""
        if self.vocab_size and bool(self.tensors["extras"][: len(tokens)].any()):
            counts = self.tensors["counts"]
            rows = torch.arange(len(tokens), device=counts.device)
            counts[rows, tokens.to(counts.device)] += 1

    def sample(
        self, logits: torch.Tensor, uniform: torch.Tensor, temperature_only: bool = False
    ) -> torch.Tensor:
        """A token for each of the first `len(logits)` rows, their counts recorded. When the
        caller knows every one of those rows is `temperature_only` (see `SamplingParams`),
        `sample` comes down to its last step, the compiled draw, which then runs directly
        (on the CPU): the same tokens without the tensor checks (~110 us a step)."""
        rows = len(logits)
        native = draw() if temperature_only and logits.device.type == "cpu" else None
        if native is not None:
            return native(logits, self.tensors["temperature"][:rows], uniform)
        tokens = sample(logits, self.batch(rows, uniform))
        self.record(tokens)
        return tokens

    def batch(self, rows: int, uniform: torch.Tensor) -> SamplingBatch:
        """The first `rows` rows, with each row's random draw for this token."""
        return SamplingBatch(
            **{name: t[:rows] for name, t in self.tensors.items()}, uniform=uniform
        )


def process(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Logit biases, then penalties (vLLM's meanings), on float logits [B, V]: repetition
    divides positive (multiplies negative) logits of tokens in the prompt or the generated
    ids; frequency subtracts per generated occurrence; presence once per generated token."""
    if params.extras is None or not bool(params.extras.any()):  # the common case: one check
        return logits
    if params.biased is not None and bool(params.biased.any()):
        logits = logits + params.logit_bias
    penalties = [params.repetition_penalty, params.frequency_penalty, params.presence_penalty]
    if params.counts is None or all(p is None for p in penalties):
        return logits
    repetition = params.repetition_penalty
    if repetition is not None and bool((repetition != 1).any()):
        seen = params.in_prompt | (params.counts > 0)
        penalty = repetition[:, None].expand_as(logits)
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, scaled, logits)
    frequency, presence = params.frequency_penalty, params.presence_penalty
    if (frequency is not None and bool((frequency != 0).any())) or (
        presence is not None and bool((presence != 0).any())
    ):
        counts = params.counts.to(logits.dtype)
        if frequency is not None:
            logits = logits - frequency[:, None] * counts
        if presence is not None:
            logits = logits - presence[:, None] * (counts > 0).to(logits.dtype)
    return logits


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Draw one token id per row of `logits[B, V]`."""
    logits = process(logits.float(), params)
    greedy_rows = params.temperature <= 0
    if bool(greedy_rows.all()):  # nothing to draw (a fast path for greedy batches)
        return logits.argmax(dim=-1)
    temperature = torch.where(greedy_rows, torch.ones_like(params.temperature), params.temperature)
    # Shift each row so its largest logit is 0: dividing by a tiny temperature then gives
    # -inf at worst, never inf (whose softmax would be NaN and pick an arbitrary token).
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature[:, None]
    drop = None  # tokens that min-p, top-k or top-p rule out
    if params.min_p is not None and bool((params.min_p > 0).any()):
        # min-p (vLLM's meaning): drop tokens less likely than min_p times the top token.
        # The top token's scaled logit is 0, so a token's ratio to it is exp(scaled).
        drop = scaled < params.min_p.log()[:, None]
        scaled = scaled.masked_fill(drop, float("-inf"))
    use_top_k = bool((params.top_k > 0).any())
    use_top_p = bool((params.top_p < 1.0).any())
    if use_top_k or use_top_p:
        # Decide what to drop in sorted order, but sample in vocabulary order: a row's token
        # then does not depend on whether another row in the batch asked for top-k or top-p.
        ranked, order = scaled.sort(dim=-1, descending=True)
        ranked_drop = torch.zeros_like(ranked, dtype=torch.bool)
        if use_top_k:
            ranks = torch.arange(ranked.shape[-1], device=ranked.device)
            k = torch.where(params.top_k > 0, params.top_k, ranked.shape[-1])
            ranked_drop |= ranks[None, :] >= k[:, None]
        if use_top_p:
            probs = torch.softmax(ranked.masked_fill(ranked_drop, float("-inf")), dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
            ranked_drop |= before >= params.top_p[:, None]
        top_drop = torch.zeros_like(ranked_drop).scatter(1, order, ranked_drop)
        drop = top_drop if drop is None else drop | top_drop
        scaled = scaled.masked_fill(top_drop, float("-inf"))
    native = draw() if logits.device.type == "cpu" else None
    if native is not None:  # the code lm.native.decode's runs of tokens draw with
        if drop is not None:
            logits = logits.masked_fill(drop, float("-inf"))
        return native(logits, params.temperature, params.uniform)
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
