"""One request's sequences in the engine, for both completions and chat: submitting every
(prompt, sample), waiting for their outputs, and the log-probabilities in OpenAI's shapes.

An engine failure ends the request as an error (a 500, or an SSE error event), never as a
normal finish.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import Request

from lm.engine import ENGINE_FAILURE, EngineStopped, Output, QueueFull, Sequence, merge_outputs
from lm.sampling import SamplingParams
from lm.tokenizers import IncrementalDecoder, Tokenizer
from service.errors import APIError
from service.loader import ServedModel
from service.metrics import Metrics


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


@dataclass
class Job:
    """One request in flight: its sequences and the queue their outputs arrive on."""

    served: ServedModel
    request_id: str
    created: int
    n: int
    prompt_ids: list[list[int]]
    sequences: list[Sequence]
    outputs: asyncio.Queue
    decoders: dict[int, IncrementalDecoder] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.served.checkpoint.tokenizer

    def usage(self) -> dict:
        prompt = sum(len(ids) for ids in self.prompt_ids)
        completion = sum(len(seq.generated) for seq in self.sequences)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def pieces(self, choice: int, token_ids: list[int]) -> list[str]:
        """The text each generated token adds (continuing the choice's earlier tokens)."""
        if choice not in self.decoders:
            self.decoders[choice] = IncrementalDecoder(
                self.tokenizer, self.prompt_ids[choice // self.n]
            )
        decoder = self.decoders[choice]
        return [decoder.push(t) for t in token_ids]

    def cancel_unfinished(self) -> None:
        for seq in self.sequences:
            if not seq.finished:
                seq.cancel()


def submit(
    served: ServedModel,
    request_id: str,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    n: int,
    stream: bool,
    metrics: Metrics,
) -> Job:
    """Hand every (prompt, sample) to the engine; 429 when its queue is full, 503 when it
    is shutting down. Sample i of a seeded request uses seed + i."""
    outputs: asyncio.Queue = asyncio.Queue()
    sequences: list[Sequence] = []
    try:
        for p_index, ids in enumerate(prompt_ids):
            for s_index in range(n):
                choice = p_index * n + s_index
                seed = None if params.seed is None else (params.seed + s_index) & ((1 << 63) - 1)

                def sink(out, _choice=choice):
                    outputs.put_nowait((_choice, out))

                sequences.append(
                    served.engine.submit(
                        ids, replace(params, seed=seed), sink, stream=stream, adapter=served.adapter
                    )
                )
    except QueueFull as exc:
        _cancel(sequences)
        metrics.rejected.labels(served.name).inc()
        raise APIError(
            429,
            f"{exc}; retry shortly",
            type_="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    except EngineStopped as exc:
        _cancel(sequences)
        raise APIError(
            503, str(exc), type_="server_error", code="shutting_down", headers={"Retry-After": "5"}
        ) from None
    except BaseException:
        _cancel(sequences)
        raise
    return Job(served, request_id, int(time.time()), n, prompt_ids, sequences, outputs)


def _cancel(sequences: list[Sequence]) -> None:
    for seq in sequences:
        seq.cancel()


async def collect(job: Job, request: Request, metrics: Metrics) -> list[Output]:
    """Every choice's whole output (merged from its pieces). Raises ClientGone when the
    client leaves first, and a 500 APIError when the engine failed."""
    pending = len(job.sequences)
    parts: list[list[Output]] = [[] for _ in range(pending)]
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        while pending:
            getter = asyncio.ensure_future(job.outputs.get())
            done, _ = await asyncio.wait({getter, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                raise ClientGone
            choice, out = getter.result()
            parts[choice].append(out)
            if out.finish_reason is not None:
                pending -= 1
                observe(job, out, streamed=False, metrics=metrics)
                if out.finish_reason == "error":
                    failure = out.error or ENGINE_FAILURE
                    raise APIError(500, failure.message, type_="server_error", code=failure.code)
    finally:
        disconnect.cancel()
        job.cancel_unfinished()
    return [merge_outputs(p) for p in parts]


async def events(job: Job, metrics: Metrics) -> AsyncIterator[list[tuple[int, Output]]]:
    """Batches of (choice, output) as the engine makes them, until every choice finished;
    records inter-token gaps and finished requests in the metrics."""
    pending = len(job.sequences)
    last_time: list[float | None] = [None] * pending
    try:
        while pending:
            batch = [await job.outputs.get()]
            while not job.outputs.empty():  # coalesce whatever else is ready
                batch.append(job.outputs.get_nowait())
            batch = _by_choice(batch)
            now = time.perf_counter()
            for choice, out in batch:
                tokens = len(out.token_ids)
                if last_time[choice] is not None and tokens:
                    metrics.observe_gaps(
                        job.served.name, (now - last_time[choice]) / tokens, tokens
                    )
                elif tokens > 1:  # the first output brought later tokens along: no wait
                    metrics.observe_gaps(job.served.name, 0.0, tokens - 1)
                last_time[choice] = now
                if out.finish_reason is not None:
                    pending -= 1
                    observe(job, out, streamed=True, metrics=metrics)
            yield batch
    finally:  # also when the client disconnects and the response is cancelled
        job.cancel_unfinished()


def _by_choice(batch: list[tuple[int, Output]]) -> list[tuple[int, Output]]:
    """One output per choice from the outputs that arrived together (each choice's in order):
    when the event loop falls behind the engine, a stream's tokens of several steps go out
    as one event and one write instead of one each, so the loop catches up."""
    if len(batch) == 1:
        return batch
    parts: dict[int, list[Output]] = {}
    for choice, out in batch:
        parts.setdefault(choice, []).append(out)
    return [(choice, merge_outputs(outs)) for choice, outs in parts.items()]


def error_event(out: Output) -> dict:
    """The SSE event that ends a stream whose sequence failed (never a normal finish)."""
    failure = out.error or ENGINE_FAILURE
    return {
        "error": {
            "message": failure.message,
            "type": "server_error",
            "param": None,
            "code": failure.code,
        }
    }


def finish_reason(out: Output) -> str:
    return "stop" if out.finish_reason == "stop" else "length"


def observe(job: Job, out: Output, streamed: bool, metrics: Metrics) -> None:
    if out.timings is not None and out.finish_reason != "cancelled":
        metrics.observe_finished(job.served.name, out.timings, out.finish_reason, streamed)


def token_text(tokenizer: Tokenizer, context: list[int], token_id: int) -> str:
    """The text `token_id` adds after `context` (for naming top-logprob candidates)."""
    context = context[-4:]
    prefix, full = tokenizer.decode(context), tokenizer.decode([*context, token_id])
    if full.startswith(prefix) and not prefix.endswith("\ufffd"):
        return full[len(prefix) :]
    return tokenizer.decode([token_id])


def prompt_pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """The text each prompt token adds; joined, they are the prompt as the model read it."""
    decoder = IncrementalDecoder(tokenizer)
    return [decoder.push(t) for t in ids]


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
