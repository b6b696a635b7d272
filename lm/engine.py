"""The continuous-batching engine: one scheduler owns the model and every sequence's state.

Each iteration admits waiting requests (prefill), runs one batched `step` for all active
sequences, samples every row with its own parameters in one vectorised call, hands new
text to each request, and retires finished or cancelled sequences. Rows live in
preallocated slots: a request joins by taking the next free slot and leaves by moving the
last row into its place, so no step copies the whole batch. Used by `lm generate` (in the
calling thread) and by the server (in a background thread).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lm import native
from lm.cuda_graphs import GraphedDecode
from lm.cuda_graphs import applies as cuda_graphs_apply
from lm.detokenize import TextTracker
from lm.device import KV_CACHE_DTYPES, resolve_kv_cache_dtype
from lm.errors import LMError
from lm.native.decode import DECODE_MATRICES
from lm.prefix_cache import DEFAULT_CAPACITY_MB, PrefixCache
from lm.sampling import SamplingParams, SamplingSlots, token_logprobs
from lm.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

# Most tokens prefilled in one step: bounds the pause that running sequences see when
# requests arrive or reach the end of their context (and the prefill's scratch memory).
PREFILL_TOKENS = 4096
# A GPT prefill batches rows with different token counts, each padded at its end to the
# longest: padding costs at most this many tokens per row, or a quarter of the batch.
PREFILL_PAD_TOKENS = 16
# Most tokens one compiled call generates for a sequence running alone (`Engine._run`): a
# request that arrives meanwhile waits at most this many tokens' time to be admitted.
RUN_TOKENS = 32


@dataclass
class Failure:
    """Why a sequence ended with finish_reason "error": a message for the client and a code."""

    message: str
    code: str


ENGINE_FAILURE = Failure("generation failed on the server; see its log", "engine_error")


@dataclass
class Output:
    """What a sequence produced since its last output (all of it when not streaming)."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None = None  # on the last output: "stop", "length", "cancelled", "error"
    top_logprobs: list[list[tuple[int, float]]] | None = None
    timings: dict | None = None  # on the last output: queue, ttft, e2e seconds, tokens
    # On the first output of a request that asked for prompt_logprobs: one entry per prompt
    # token, None for the first (nothing predicts it).
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    error: Failure | None = None  # on the last output, when finish_reason is "error"
    first: bool = False  # the sequence's first output (its time to first token)


def merge_outputs(parts: list[Output]) -> Output:
    """One output from a sequence's consecutive outputs, in order."""
    if len(parts) == 1:
        return parts[0]
    logprobs = None if parts[0].logprobs is None else [x for p in parts for x in p.logprobs]
    top = None if parts[0].top_logprobs is None else [x for p in parts for x in p.top_logprobs]
    return Output(
        text="".join(p.text for p in parts),
        token_ids=[t for p in parts for t in p.token_ids],
        logprobs=logprobs,
        finish_reason=parts[-1].finish_reason,
        timings=parts[-1].timings,
        top_logprobs=top,
        prompt_logprobs=parts[0].prompt_logprobs,
        prompt_top_logprobs=parts[0].prompt_top_logprobs,
        error=parts[-1].error,
        first=parts[0].first,
    )


class QueueFull(LMError):
    """The engine's waiting queue is full; the caller should retry later."""


class EngineStopped(LMError):
    """The engine no longer admits requests (shutting down)."""


_ids = itertools.count()


class Sequence:
    """One request's generation: its tokens, text, stop handling and delivery."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        sink: Callable[[Output], None] | None,
        stream: bool,
        stream_interval: int = 1,
        adapter: int = 0,
    ):
        if not prompt_ids:
            raise LMError("the prompt must hold at least one token")
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.temperature_only = params.temperature_only  # asked at every step
        self.adapter = adapter  # the LoRA adapter its rows use (lm.lora; 0: the base model)
        self.seed = (
            params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        )
        self.rng = random.Random(self.seed)  # this request's own draws, whatever its batch
        self.sink = sink
        self.stream = stream
        self.stream_interval = stream_interval  # tokens per streamed output (the last: fewer)
        self.generated: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.tracker = TextTracker(tokenizer, self.prompt_ids, params.stop)
        self.sent_chars = 0  # how much of it has been handed out
        self.sent_tokens = 0
        self.finish_reason: str | None = None
        self.error: Failure | None = None
        self.cancelled = False
        self.cached = 0  # tokens held in the model state
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.outputs: list[Output] = []  # collected here when there is no sink
        self.prompt_scores: tuple[list, list] | None = None  # set by the engine, sent once

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """All generated text so far (up to a stop sequence)."""
        return self.tracker.text

    def history(self) -> list[int]:
        return self.prompt_ids + self.generated

    def add_token(
        self, token_id: int, logprob: float | None, top: list | None, now: float
    ) -> Output | None:
        """Record a sampled token; return an output to deliver now, if any."""
        if self.first_token_at is None:
            self.first_token_at = now
        self.generated.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.top_logprobs.append(top or [])
        if not (self.stream or self.params.stop):  # nobody reads the text before the end
            if len(self.generated) >= self.params.max_new_tokens:
                self.tracker.decode_all(self.generated)
                self.finish_reason = "length"
                return self._output(len(self.text), now)
            return None
        stopped, hold = self.tracker.push(token_id)
        if stopped:
            self.finish_reason = "stop"
        if self.finish_reason is None and len(self.generated) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            return self._output(len(self.text), now)
        if (
            self.stream
            and len(self.text) - hold > self.sent_chars
            and len(self.generated) - self.sent_tokens >= self.stream_interval
        ):
            return self._output(len(self.text) - hold, now)
        return None

    def finish(self, reason: str, now: float) -> Output:
        if not (self.stream or self.params.stop):
            self.tracker.decode_all(self.generated)
        self.finish_reason = reason
        return self._output(len(self.text), now)

    def fail(self, error: Failure, now: float) -> Output:
        """End with finish_reason "error" and say why."""
        self.error = error
        return self.finish("error", now)

    def _output(self, upto: int, now: float) -> Output:
        text = self.text[self.sent_chars : upto]
        tokens = self.generated[self.sent_tokens :]
        first = self.sent_tokens == 0
        wants = self.params.logprobs is not None
        logprobs = self.logprobs[self.sent_tokens :] if wants else None
        top = self.top_logprobs[self.sent_tokens :] if wants else None
        self.sent_chars, self.sent_tokens = upto, len(self.generated)
        prompt_logprobs, prompt_top = self.prompt_scores or (None, None)
        self.prompt_scores = None
        timings = None
        if self.finish_reason is not None:
            admitted = self.admitted_at or now
            first = self.first_token_at or now
            timings = {
                "queue_s": admitted - self.submitted_at,
                "ttft_s": first - self.submitted_at,
                "e2e_s": now - self.submitted_at,
                "decode_s": now - first,
                "prompt_tokens": len(self.prompt_ids),
                "completion_tokens": len(self.generated),
            }
        return Output(
            text,
            tokens,
            logprobs,
            self.finish_reason,
            top_logprobs=top,
            timings=timings,
            prompt_logprobs=prompt_logprobs,
            prompt_top_logprobs=prompt_top,
            error=self.error,
            first=first,
        )


class Engine:
    """Continuous batching over one model. Thread-safe `submit`; one thread runs `step`."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        max_batch: int = 64,
        max_queue: int = 256,
        device: torch.device | str | None = None,
        notify: Callable[[list[tuple[Sequence, Output]]], None] | None = None,
        threads: int | None = None,
        kv_cache_dtype: str = "auto",
        stream_interval: int = 1,
        prefix_cache_mb: float = DEFAULT_CAPACITY_MB,
        cuda_graphs: bool = True,
        decode_matrices: str = "auto",
    ):
        if max_batch < 1:
            raise LMError("max_batch must be at least 1")
        if prefix_cache_mb < 0:
            raise LMError(f"prefix_cache_mb must not be negative, got {prefix_cache_mb}")
        if stream_interval < 1:
            raise LMError(f"stream_interval must be at least 1, got {stream_interval}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise LMError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                f"got {kv_cache_dtype!r}"
            )
        if decode_matrices not in DECODE_MATRICES:
            raise LMError(
                f"decode_matrices must be one of {', '.join(DECODE_MATRICES)}, "
                f"got {decode_matrices!r}"
            )
        self.model = model.eval()
        if decode_matrices != "auto":  # GPT steps on the CPU (lm.native.decode)
            model.decode_matrices = decode_matrices
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.notify = notify
        self.threads = threads  # CPU threads of the background loop (None: the process's)
        self.stream_interval = stream_interval
        self.context_size: int | None = getattr(model, "context_size", None)
        if kv_cache_dtype != "auto" and self.context_size is None:
            raise LMError(
                "kv_cache_dtype applies to GPT models only (recurrent models keep "
                "a hidden state, not a KV cache)"
            )
        if self.context_size is not None and self.device.type == "cpu":
            native.decode_attention()  # built now (once per machine), not in the first step
        self.kv_cache_dtype = resolve_kv_cache_dtype(model, self.device, kv_cache_dtype)
        self._cache_dtype = (
            {} if self.context_size is None else {"cache_dtype": self.kv_cache_dtype}
        )
        self.state = model.init_state(max_batch, self.device, **self._cache_dtype)
        # On a GPU, decode steps replay CUDA graphs recorded over these state tensors.
        self.graphs: GraphedDecode | None = None
        if cuda_graphs and cuda_graphs_apply(model, self.device):
            self.graphs = GraphedDecode(model, self.state, max_batch)
            with torch.inference_mode():
                self.graphs.capture_all()  # now, not in the first requests' steps
        # Prompt-prefix KV blocks for later requests (GPT models; 0 MB turns it off).
        self.prefix_cache: PrefixCache | None = None
        if prefix_cache_mb > 0 and hasattr(model, "read_prefix"):
            self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20))
        config = getattr(model, "config", None)
        self.vocab_size: int = getattr(config, "vocab_size", None) or tokenizer.vocab_size
        self.sampling = SamplingSlots(max_batch, self.vocab_size, self.device)
        self.active: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.accepting = True
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop_thread = False
        self.steps = 0
        self.nonfinite_rows = 0  # sequences failed for non-finite logits (a metric)

    # -- requests -------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Callable[[Output], None] | None = None,
        stream: bool = False,
        adapter: int = 0,
    ) -> Sequence:
        """Queue a request (with `adapter`, one of the model's LoRA adapters, 1-based).
        Raises QueueFull when `max_queue` requests already wait."""
        params.validate()
        if any(not 0 <= i < self.vocab_size for i in prompt_ids):
            raise LMError(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        if any(i >= self.vocab_size for i in params.logit_bias):
            raise LMError(
                f"logit_bias token ids must be below {self.vocab_size}", param="logit_bias"
            )
        if (
            params.prompt_logprobs is not None
            and self.context_size is not None
            and len(prompt_ids) > self.context_size
        ):
            raise LMError(
                f"prompt log-probabilities need the prompt within the model's context "
                f"({self.context_size} tokens), got {len(prompt_ids)}",
                param="prompt",
            )
        if not 0 <= adapter <= getattr(self.model, "adapter_count", 0):
            raise LMError(
                f"adapter {adapter}: the model serves "
                f"{getattr(self.model, 'adapter_count', 0)} adapters"
            )
        if adapter and params.prompt_logprobs is not None:  # scoring runs the base's forward
            raise LMError(
                "prompt log-probabilities (echo with logprobs) are not available for "
                "LoRA adapters yet; score with the base model or a merged checkpoint "
                "(lm merge)",
                param="echo",
            )
        seq = Sequence(
            prompt_ids, params, self.tokenizer, sink, stream, self.stream_interval, adapter
        )
        with self._lock:
            if not self.accepting:
                raise EngineStopped("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self.waiting.append(seq)
            self._lock.notify()
        return seq

    @property
    def num_running(self) -> int:
        return len(self.active)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

    # -- the loop -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduler iteration. Returns False when there was nothing to do."""
        events: list[tuple[Sequence, Output]] = []
        self._retire_cancelled(events)
        self._admit(events)
        if self.active:
            self._decode(events)
            self.steps += 1
        self._deliver(events)
        return bool(self.active or events)

    def _admit(self, events) -> None:
        """Move waiting requests into free rows, up to PREFILL_TOKENS prompt tokens (at
        least one request) per step; the rest wait for the next step."""
        admitted, budget = [], PREFILL_TOKENS
        leaders: dict[tuple, list[int]] = {}  # this step's new prefixes (see _prefill_cost)
        while len(self.active) < self.max_batch:
            with self._lock:
                if not self.waiting:
                    break
                seq = self.waiting[0]
                cost = 0 if seq.cancelled else self._prefill_cost(seq, leaders)
                if admitted and cost > budget:
                    break
                self.waiting.popleft()
            if seq.cancelled:
                events.append((seq, seq.finish("cancelled", time.perf_counter())))
                continue
            if seq.params.prompt_logprobs is not None:
                try:
                    seq.prompt_scores = self._score_prompt(seq)
                except Exception:  # the request is no longer queued: fail it, not the loop
                    logger.exception("scoring a prompt failed; failing its request")
                    events.append((seq, seq.finish("error", time.perf_counter())))
                    continue
            if seq.params.max_new_tokens == 0:  # only scoring: done without taking a row
                seq.admitted_at = time.perf_counter()
                events.append((seq, seq.finish("length", seq.admitted_at)))
                continue
            budget -= cost
            row = len(self.active)
            self.active.append(seq)
            seq.admitted_at = time.perf_counter()
            self.sampling.set(row, seq.params, seq.prompt_ids, seq.generated)
            admitted.append(row)
        self._fill_rows(admitted)

    def _score_prompt(self, seq: Sequence) -> tuple[list, list]:
        """Each prompt token's log-probability given the tokens before it (None for the
        first), and the `prompt_logprobs` most likely tokens at each position."""
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)
        k = seq.params.prompt_logprobs
        if ids.shape[1] < 2:
            return [None], [None]
        logits = self.model(ids)[0, :-1]
        chosen, values, top_ids = token_logprobs(logits, ids[0, 1:], k)
        top = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
        return [None, *chosen.tolist()], [None, *top]

    def _context(self, seq: Sequence) -> list[int]:
        """What a prefill puts in `seq`'s row: all but its newest token (which goes through
        the next decode step), or once the history outgrows a GPT's context, only the
        newest half of the context (a sliding window, as llama.cpp's context shift)."""
        context = seq.history()[:-1]
        if self.context_size is not None and len(context) >= self.context_size:
            context = context[len(context) - self.context_size // 2 :]
        return context

    def _prefill_cost(self, seq: Sequence, leaders: dict[tuple, list[int]]) -> int:
        """Tokens a prefill of `seq` would run: its context less what the prefix cache holds,
        and less the whole blocks it shares with a request admitted in the same step whose
        first uncached block is its own (`leaders`: that block's key -> the context that
        computes it). `_fill_rows` runs the first such request first and the others find
        its blocks cached, so a wave of requests sharing a new prefix is admitted at once."""
        context = self._context(seq)
        if self.prefix_cache is None:
            return len(context)
        cached = self.prefix_cache.peek(context, seq.adapter)
        size = self.prefix_cache.block_tokens
        if len(context) - cached < size:
            return len(context) - cached
        key = (seq.adapter, tuple(context[: cached + size]))
        leader = leaders.setdefault(key, context)
        if leader is not context:
            shared = len(os.path.commonprefix([leader, context])) // size * size
            cached = max(cached, shared)
        return len(context) - cached

    def _fill_rows(self, rows: list[int]) -> None:
        """Reset rows and prefill each with its context: the cached blocks of its prefix are
        copied in, the rest runs through the model. Rows with about the same number of tokens
        to run go as one batch (`_batches`), up to PREFILL_TOKENS tokens at a time.

        Rows whose first uncached block is the same (requests that share a prefix not yet
        cached) do not all compute it: one goes first, and the others follow in a second
        round that finds the prefix cached."""
        pending = rows
        while pending:
            ready: list[tuple[int, list[int], list]] = []
            later, leaders = [], set()
            for row in pending:
                seq = self.active[row]
                context = self._context(seq)
                seq.cached = len(context)
                chain = []
                if self.prefix_cache is not None and context:
                    size = self.prefix_cache.block_tokens
                    cached = self.prefix_cache.peek(context, seq.adapter)
                    if len(context) - cached >= size:  # a whole block to compute and keep
                        first_new = (seq.adapter, tuple(context[: cached + size]))
                        if first_new in leaders:
                            later.append(row)
                            continue
                        leaders.add(first_new)
                    chain = self.prefix_cache.match(context, seq.adapter)
                ready.append((row, context, chain))
            batches = self._batches(ready)
            if sorted(pending) == list(range(len(self.active) - len(pending), len(self.active))):
                # New rows (the batch's last): put each prefill batch's rows side by side,
                # so that it runs in place rather than through a copy of every row's cache.
                moved = self._reorder_tail([row for b in batches for row, _, _ in b] + later)
                batches = [[(moved[row], c, chain) for row, c, chain in b] for b in batches]
                later = [moved[row] for row in later]
            for group in batches:
                self._prefill(group)
            pending = later

    def _reorder_tail(self, order: list[int]) -> dict[int, int]:
        """Move the batch's last len(order) rows, sequences about to be prefilled, so that
        row order[i] becomes the i-th of them: their sequences and sampling rows move, their
        model state is reset by the prefill anyway. Returns {old row: new row}."""
        start = len(self.active) - len(order)
        moved = {row: start + i for i, row in enumerate(order)}
        if all(old == new for old, new in moved.items()):
            return moved
        self._move_rows(start, order, self.sampling.tensors.values())
        return moved

    def _batches(
        self, ready: list[tuple[int, list[int], list]]
    ) -> list[list[tuple[int, list[int], list]]]:
        """Prefill batches of (row, context, cached chain), each at most PREFILL_TOKENS
        tokens (or one row). A recurrent model's rows go with rows of exactly their length;
        a GPT's rows are padded at their end to the batch's longest, within
        PREFILL_PAD_TOKENS per row or a quarter of the batch: a few-shot request's few new
        tokens after a cached prefix then go with the others', not one batch per length."""
        block = getattr(self.prefix_cache, "block_tokens", 0)

        def start(item) -> int:
            return len(item[2]) * block

        def todo(item) -> int:
            return len(item[1]) - start(item)

        if self.context_size is None:
            by_length: dict[int, list] = {}
            for item in ready:
                by_length.setdefault(todo(item), []).append(item)
            batches = []
            for length, group in by_length.items():
                size = max(1, PREFILL_TOKENS // max(1, length))
                batches += [group[i : i + size] for i in range(0, len(group), size)]
            return batches
        # Rows with nothing cached apart from those with a cached prefix: a batch of empty
        # rows runs the fused causal attention, one with cached rows a masked product. And
        # short rows apart from long ones: the model multiplies in bfloat16 from a number
        # of tokens per row, and a row padded past it would not get the numbers it gets
        # alone.
        long = getattr(self.model, "bf16_prefill_tokens", math.inf)

        def kind(item) -> tuple[bool, bool]:
            return start(item) > 0, todo(item) >= long

        batches, batch, real, top = [], [], 0, 0
        for item in sorted(ready, key=lambda item: (kind(item), todo(item))):
            width, count = todo(item), len(batch) + 1  # sorted: the batch's longest
            padded = count * width
            if batch and (
                kind(item) != kind(batch[0])
                or padded > PREFILL_TOKENS
                or max(top, start(item)) + width > self.context_size
                or padded - real - width > max(PREFILL_PAD_TOKENS * count, padded // 4)
            ):
                batches.append(batch)
                batch, real, top = [], 0, 0
            batch.append(item)
            real += width
            top = max(top, start(item))
        if batch:
            batches.append(batch)
        # In row order: adjacent rows are prefilled in place (`_prefill`).
        return [sorted(batch, key=lambda item: item[0]) for batch in batches]

    def _prefill(self, group: list[tuple[int, list[int], list]]) -> None:
        """Prefill rows in one model step: each row's cached prefix blocks are written in,
        then its remaining context tokens (the same count in every row) run."""
        rows = [row for row, _, _ in group]
        first, count = rows[0], len(rows)
        if rows == list(range(first, first + count)):  # adjacent rows: work in place
            state = {name: tensor[first : first + count] for name, tensor in self.state.items()}
            for tensor in state.values():
                tensor.zero_()
            index = None
        else:
            state = self.model.init_state(count, self.device, **self._cache_dtype)
            index = torch.tensor(rows, device=self.device)
        if "adapter" in state:  # the rows' LoRA adapters, moved with the rows from now on
            state["adapter"].copy_(torch.tensor([self.active[row].adapter for row in rows]))
        starts = [0] * count
        by_chain: dict[tuple[int, ...], list[int]] = {}  # rows with the same cached blocks
        for i, (_, _, chain) in enumerate(group):
            if chain:
                by_chain.setdefault(tuple(block.id for block in chain), []).append(i)
        for indices in by_chain.values():
            chain = group[indices[0]][2]
            end = self.model.write_prefix(state, indices, [block.kv for block in chain])
            for i in indices:
                starts[i] = end
        remaining = [context[start:] for (_, context, _), start in zip(group, starts)]
        width = max(len(tokens) for tokens in remaining)
        if width:
            # Rows padded at their end: the model attends each row over its own tokens only
            # (`lengths`: its numbers do not depend on its batch-mates), and each row's
            # position is set after its real tokens (later steps overwrite what the padding
            # wrote beyond it).
            padded = [tokens + [0] * (width - len(tokens)) for tokens in remaining]
            ids = torch.tensor(padded, dtype=torch.long, device=self.device)
            lengths = [len(tokens) for tokens in remaining]
            if len(set(lengths)) > 1:  # a GPT (rows of recurrent models are never padded)
                _, new_state = self.model.step(ids, state, lengths=lengths)
            else:
                _, new_state = self.model.step(ids, state)
            _write_back(state, new_state)
            if any(len(tokens) != width for tokens in remaining):
                state["pos"].copy_(
                    torch.tensor(
                        [s + len(t) for s, t in zip(starts, remaining)],
                        dtype=state["pos"].dtype,
                        device=self.device,
                    )
                )
        if self.prefix_cache is not None:
            for i, (row, context, _) in enumerate(group):
                self.prefix_cache.insert(
                    context,
                    lambda start, end, i=i: self.model.read_prefix(
                        state, i, start, end, self.prefix_cache.block_tokens
                    ),
                    self.active[row].adapter,
                )
        if index is not None:
            for name, tensor in self.state.items():
                tensor.index_copy_(0, index, state[name])

    def _run(self, events) -> bool:
        """A sequence running alone, with nobody waiting, sampling by temperature only:
        generate up to RUN_TOKENS of its tokens in one compiled call (the model's
        `generate_run`), without a round trip through Python per token. Its draws come from
        its own generator in the same order and go through the same sampling code as the
        per-step path's, so it gets the same tokens. Returns False where this does not apply
        (the per-step path runs instead)."""
        if len(self.active) != 1 or self.waiting or not hasattr(self.model, "generate_run"):
            return False
        seq, params = self.active[0], self.active[0].params
        if (
            not seq.generated  # the first token goes alone: its time is the time to first token
            or params.logprobs is not None
            or not seq.temperature_only
        ):
            return False
        count = min(RUN_TOKENS, params.max_new_tokens - len(seq.generated))
        if self.context_size is not None:
            count = min(count, self.context_size - seq.cached)
        if count < 2:
            return False
        before = seq.rng.getstate()
        uniform = [seq.rng.random() for _ in range(count)]
        tokens = self.model.generate_run(
            seq.generated[-1], 0, self.state, params.temperature, uniform
        )
        if tokens is None or len(tokens) < count:  # not run, or stopped at non-finite logits
            seq.rng.setstate(before)  # the draws not used are drawn again by the next steps
            for _ in range(len(tokens or ())):
                seq.rng.random()
        if not tokens:
            return False
        now = time.perf_counter()
        for token in tokens:
            seq.cached += 1
            out = seq.add_token(token, None, None, now)
            if out is not None:
                events.append((seq, out))
            if seq.finished:  # a stop sequence: the tokens after it are dropped
                self._remove_row(0)
                break
        return True

    def _decode(self, events) -> None:
        if self._run(events):
            return
        n = len(self.active)
        if self.context_size is not None:
            full = [
                row for row, seq in enumerate(self.active) if seq.cached + 1 > self.context_size
            ]
            shifts = max(1, PREFILL_TOKENS // max(1, self.context_size // 2))
            if len(full) > shifts:  # more context shifts than one step's prefill allows:
                n = self._sit_out(full[shifts:])  # the rest wait at the end of the batch
                full = [row for row in range(n) if self.active[row].cached + 1 > self.context_size]
            self._fill_rows(full)
        active = self.active[:n]
        last = [seq.generated[-1] if seq.generated else seq.prompt_ids[-1] for seq in active]
        ids = torch.tensor(last, dtype=torch.long, device=self.device)[:, None]
        # A graph's bucket may hold rows past n: only free ones (not rows sitting out).
        if self.graphs is not None and (n == len(self.active) or self.graphs.bucket(n) == n):
            logits = self.graphs(ids)
        else:
            view = {name: tensor[:n] for name, tensor in self.state.items()}
            logits, new_state = self.model.step(ids, view)
            _write_back(view, new_state)
        broken = _nonfinite_rows(logits)
        self.nonfinite_rows += len(broken)
        uniform = torch.tensor([seq.rng.random() for seq in active], dtype=torch.float64)
        plain = all(seq.temperature_only for seq in active)
        tokens = self.sampling.sample(logits, uniform, temperature_only=plain)
        top_k = max(
            (s.params.logprobs for s in active if s.params.logprobs is not None), default=None
        )
        chosen, top = None, None
        if top_k is not None:
            chosen_t, top_values, top_ids = token_logprobs(logits, tokens, top_k)
            chosen = chosen_t.tolist()
            top = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_values.tolist())]
        now = time.perf_counter()
        finished = []
        for row, (seq, token) in enumerate(zip(active, tokens.tolist())):
            seq.cached += 1
            if broken and row in broken:  # this row only: the others carry on
                events.append((seq, seq.fail(_nonfinite_failure(len(seq.generated) + 1), now)))
                finished.append(row)
                continue
            if chosen is not None and seq.params.logprobs is not None:
                out = seq.add_token(token, chosen[row], top[row][: seq.params.logprobs], now)
            else:
                out = seq.add_token(token, None, None, now)
            if out is not None:
                events.append((seq, out))
            if seq.finished:
                finished.append(row)
        for row in reversed(finished):
            self._remove_row(row)

    def _retire_cancelled(self, events) -> None:
        now = time.perf_counter()
        for row in range(len(self.active) - 1, -1, -1):
            seq = self.active[row]
            if seq.cancelled:
                events.append((seq, seq.finish("cancelled", now)))
                self._remove_row(row)

    def _sit_out(self, rows: list[int]) -> int:
        """Move `rows` to the end of the batch, keeping both groups' order; return how many
        rows stay in front (they take this step, the others the next)."""
        n, leaving = len(self.active), set(rows)
        order = [row for row in range(n) if row not in leaving] + sorted(leaving)
        self._move_rows(0, order, (*self.state.values(), *self.sampling.tensors.values()))
        return n - len(leaving)

    def _move_rows(self, start: int, order: list[int], tensors) -> None:
        """Rows start, start + 1, ... take what rows order[0], order[1], ... held: their
        sequences and their rows of `tensors`."""
        index = torch.tensor(order, device=self.device)
        for tensor in tensors:
            tensor[start : start + len(order)] = tensor.index_select(0, index.to(tensor.device))
        self.active[start : start + len(order)] = [self.active[row] for row in order]

    def _remove_row(self, row: int) -> None:
        """Drop row `row`, moving the last row into its slot."""
        last = len(self.active) - 1
        if row != last:
            for tensor in (*self.state.values(), *self.sampling.tensors.values()):
                tensor[row] = tensor[last]
            self.active[row] = self.active[last]
        self.active.pop()

    def _deliver(self, events: list[tuple[Sequence, Output]]) -> None:
        if not events:
            return
        if self.notify is not None:
            self.notify(events)
            return
        for seq, out in events:
            if seq.sink is not None:
                seq.sink(out)
            else:
                seq.outputs.append(out)

    # -- running --------------------------------------------------------------------------

    def run_until_idle(self) -> None:
        """Step in the calling thread until every submitted request has finished."""
        while self.step() or self.has_work():
            pass

    def start(self) -> None:
        """Run the scheduler in a background thread (the server's mode)."""
        if self._thread is not None:
            return
        self._stop_thread = False
        self._thread = threading.Thread(target=self._loop, name="lm-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        if self.threads is not None:
            # OpenMP settings belong to the thread that starts parallel work: set them here,
            # in the thread that runs the model (see `lm.engine.serving_threads`).
            torch.set_num_threads(self.threads)
        while not self._stop_thread:
            with self._lock:
                while not (self.waiting or self.active or self._stop_thread):
                    self._lock.wait(timeout=0.5)
            if self._stop_thread:
                break
            try:
                self.step()
            except Exception:  # a bug must not hang every request: fail the running ones
                logger.exception("engine step failed; failing the running requests")
                self._fail_running()

    def _fail_running(self) -> None:
        now = time.perf_counter()
        events = [(seq, seq.fail(ENGINE_FAILURE, now)) for seq in self.active]
        self.active.clear()
        self._deliver(events)

    def stop_accepting(self) -> None:
        with self._lock:
            self.accepting = False

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish up to `timeout`, cancel the rest."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        while self.has_work() and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.01)
        with self._lock:
            for seq in list(self.waiting) + list(self.active):
                seq.cancel()
        if self._thread is not None:
            deadline = time.monotonic() + 2.0
            while self.has_work() and time.monotonic() < deadline:
                time.sleep(0.01)
            self._stop_thread = True
            with self._lock:
                self._lock.notify_all()
            self._thread.join(timeout=5.0)
            self._thread = None


def _nonfinite_rows(logits: torch.Tensor) -> set[int]:
    """Rows of a step's `logits[B, V]` holding a NaN or an infinity. Those rows are zeroed
    in place, so that sampling the batch stays defined; their tokens are discarded.

    One vectorised pass per step: the sum of all logits (NaN and inf propagate into it; 25x
    cheaper than `isfinite` on every logit for a 50k vocabulary), and the exact per-logit
    test only when that sum is not finite (huge finite logits may also overflow a sum)."""
    if math.isfinite(float(logits.sum())):
        return set()
    broken = ~torch.isfinite(logits).all(dim=-1)
    if not bool(broken.any()):
        return set()
    logits.masked_fill_(broken[:, None], 0.0)
    return set(broken.nonzero().flatten().tolist())


def _nonfinite_failure(position: int) -> Failure:
    return Failure(
        f"the model's output is not finite (NaN or infinite logits) at generated token "
        f"{position}, so this request cannot go on; the model's weights or this prompt's "
        "state are numerically broken (`lm check` validates a checkpoint's weights)",
        "nonfinite_logits",
    )


def _write_back(view: dict[str, torch.Tensor], new_state: dict[str, torch.Tensor]) -> None:
    """Copy a step's new state into the slot views (tensors updated in place are skipped)."""
    for name, tensor in new_state.items():
        target = view[name]
        if tensor.data_ptr() != target.data_ptr():
            target.copy_(tensor)
