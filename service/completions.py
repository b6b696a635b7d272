"""Completions: from a validated request to engine sequences, and their outputs back to a
JSON response or a stream of server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import Response

from lm.engine import EngineStopped, Output, QueueFull, Sequence
from lm.fewshot import DEFAULT_TEMPLATE, Example, build_prompt
from lm.generate import encode_prompt
from service.errors import APIError
from service.loader import ServedModel
from service.metrics import Metrics
from service.schemas import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Logprobs,
    Usage,
)
from service.settings import Settings


def text_list(value: str | list[str], param: str, settings: Settings) -> list[str]:
    """A request's text or texts as a list, within the server's count limit."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise APIError(400, f"{param}: must not be an empty list", param=param)
    if len(texts) > settings.max_prompts:
        raise APIError(400, f"{param}: at most {settings.max_prompts} texts per request",
                       param=param)
    return texts


def check_lengths(texts: list[str], param: str, settings: Settings) -> None:
    """Every text non-empty and within the size limit (413 beyond it)."""
    for text in texts:
        if not text:
            raise APIError(400, f"{param}: must not be empty", param=param)
        if len(text) > settings.max_prompt_chars:
            raise APIError(413, f"{param}: longer than {settings.max_prompt_chars} characters",
                           param=param, code="prompt_too_long")


def prepare(body: CompletionRequest, served: ServedModel, settings: Settings):
    """Check a request against the server's limits; build prompts, ids and parameters."""
    prompts = text_list(body.prompt, "prompt", settings)
    if body.n * len(prompts) > settings.max_n:
        raise APIError(400, f"n: at most {settings.max_n} completions per request "
                            f"(prompts x n), got {body.n * len(prompts)}", param="n")
    params = body.to_sampling_params(settings)
    if body.examples is not None or body.template is not None:
        if not body.examples:
            raise APIError(400, "examples: at least one example is needed for a few-shot "
                                "request", param="examples")
        examples = [Example(e.input, e.output) for e in body.examples]
        built = []
        for query in prompts:
            text, default_stop = build_prompt(examples, query, body.template or DEFAULT_TEMPLATE)
            built.append(text)
        prompts = built
        params.stop = params.stop or default_stop
    check_lengths(prompts, "prompt", settings)
    prompt_ids = [encode_prompt(served.checkpoint, text) for text in prompts]
    return params, prompts, prompt_ids


@dataclass
class Job:
    """One completion request in flight: its sequences and the queue their outputs arrive on."""

    served: ServedModel
    body: CompletionRequest
    request_id: str
    created: int
    prompts: list[str]
    prompt_ids: list[list[int]]
    sequences: list[Sequence]
    outputs: asyncio.Queue

    def usage(self) -> Usage:
        prompt = sum(len(ids) for ids in self.prompt_ids)
        completion = sum(len(seq.generated) for seq in self.sequences)
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)

    def logprobs(self, out: Output, offset: int) -> Logprobs | None:
        if self.body.logprobs is None or out.logprobs is None:
            return None
        tokenizer = self.served.checkpoint.tokenizer
        tokens = [tokenizer.id_to_token(t) for t in out.token_ids]
        offsets, position = [], offset
        for token in tokens:
            offsets.append(position)
            position += len(token)
        top = None
        if self.body.logprobs > 0 and out.top_logprobs is not None:
            top = [{tokenizer.id_to_token(t): v for t, v in row} for row in out.top_logprobs]
        return Logprobs(tokens=tokens, token_logprobs=list(out.logprobs), top_logprobs=top,
                        text_offset=offsets)

def _finish_reason(out: Output) -> str:
    return "stop" if out.finish_reason == "stop" else "length"

async def complete(job: Job, request: Request, metrics: Metrics) -> CompletionResponse | Response:
    pending = len(job.sequences)
    texts = [""] * pending
    parts: list[list[Output]] = [[] for _ in range(pending)]
    finals: list[Output | None] = [None] * pending
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        while pending:
            getter = asyncio.ensure_future(job.outputs.get())
            done, _ = await asyncio.wait({getter, disconnect},
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:  # the client left: nobody reads this response
                getter.cancel()
                return Response(status_code=499)  # nginx's "client closed request"
            choice, out = getter.result()
            texts[choice] += out.text
            parts[choice].append(out)
            if out.finish_reason is not None:
                finals[choice] = out
                pending -= 1
                _observe(job, out, streamed=False, metrics=metrics)
    finally:
        disconnect.cancel()
        for seq in job.sequences:
            if not seq.finished:
                seq.cancel()
    choices = []
    for choice, text in enumerate(texts):
        prefix = job.prompts[choice // job.body.n] if job.body.echo else ""
        merged = _merge(parts[choice])
        choices.append(CompletionChoice(
            text=prefix + text, index=choice,
            logprobs=job.logprobs(merged, len(prefix)),
            finish_reason=_finish_reason(finals[choice])))
    return CompletionResponse(id=job.request_id, created=job.created, model=job.served.name,
                              choices=choices, usage=job.usage())

async def stream(job: Job, metrics: Metrics) -> AsyncIterator[str]:
    pending = len(job.sequences)
    offsets = [0] * pending
    last_time = [None] * pending
    try:
        if job.body.echo:
            for choice in range(pending):
                prompt = job.prompts[choice // job.body.n]
                offsets[choice] = len(prompt)
                yield _sse(job, choice, prompt, None, None)
        while pending:
            choice, out = await job.outputs.get()
            # Coalesce whatever else is ready into the same write.
            batch = [(choice, out)]
            while not job.outputs.empty():
                batch.append(job.outputs.get_nowait())
            chunks = []
            now = time.perf_counter()
            for choice, out in batch:
                if last_time[choice] is not None and out.token_ids:
                    tokens = len(out.token_ids)
                    metrics.observe_gaps(job.served.name, (now - last_time[choice]) / tokens,
                                         tokens)
                last_time[choice] = now
                finish = _finish_reason(out) if out.finish_reason is not None else None
                if out.text or finish is not None:
                    chunks.append(_sse(job, choice, out.text, job.logprobs(out, offsets[choice]),
                                       finish))
                offsets[choice] += len(out.text)
                if out.finish_reason == "error":
                    error = {"message": "generation failed on the server; see its log",
                             "type": "server_error", "param": None, "code": None}
                    chunks.append(f"data: {json.dumps({'error': error})}\n\n")
                if out.finish_reason is not None:
                    pending -= 1
                    _observe(job, out, streamed=True, metrics=metrics)
            if chunks:
                yield "".join(chunks)
        if job.body.stream_options is not None and job.body.stream_options.include_usage:
            chunk = {"id": job.request_id, "object": "text_completion", "created": job.created,
                     "model": job.served.name, "choices": [],
                     "usage": job.usage().model_dump()}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects and the response is cancelled
        for seq in job.sequences:
            if not seq.finished:
                seq.cancel()

def _sse(job: Job, choice: int, text: str, logprobs: Logprobs | None,
         finish: str | None) -> str:
    chunk = {
        "id": job.request_id, "object": "text_completion", "created": job.created,
        "model": job.served.name,
        "choices": [{"text": text, "index": choice,
                     "logprobs": logprobs.model_dump() if logprobs else None,
                     "finish_reason": finish}],
    }
    return f"data: {json.dumps(chunk)}\n\n"

def _observe(job: Job, out: Output, streamed: bool, metrics: Metrics) -> None:
    if out.timings is not None and out.finish_reason != "cancelled":
        metrics.observe_finished(job.served.name, out.timings, out.finish_reason, streamed)


def submit(body: CompletionRequest, served: ServedModel, settings: Settings,
           metrics: Metrics) -> Job:
    """Hand every (prompt, sample) of a request to the engine; 429 when its queue is full."""
    params, prompts, prompt_ids = prepare(body, served, settings)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    outputs: asyncio.Queue = asyncio.Queue()
    sequences: list[Sequence] = []
    try:
        for p_index, ids in enumerate(prompt_ids):
            for s_index in range(body.n):
                choice = p_index * body.n + s_index
                seed = None if body.seed is None else (body.seed + s_index) & ((1 << 63) - 1)
                choice_params = replace(params, seed=seed)

                def sink(out, _choice=choice):
                    outputs.put_nowait((_choice, out))

                sequences.append(served.engine.submit(ids, choice_params, sink,
                                                      stream=body.stream,
                                                      adapter=served.adapter))
    except QueueFull as exc:
        for seq in sequences:
            seq.cancel()
        metrics.rejected.labels(served.name).inc()
        raise APIError(429, f"{exc}; retry shortly", type_="rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except EngineStopped as exc:
        for seq in sequences:
            seq.cancel()
        raise APIError(503, str(exc), type_="server_error", code="shutting_down",
                       headers={"Retry-After": "5"}) from None

    return Job(served, body, request_id, created, prompts, prompt_ids, sequences, outputs)


def _merge(parts: list[Output]) -> Output:
    """One output from a sequence's pieces (non-streaming requests get one piece anyway)."""
    if len(parts) == 1:
        return parts[0]
    logprobs = None if parts[0].logprobs is None else [x for p in parts for x in p.logprobs]
    top = None if parts[0].top_logprobs is None else [x for p in parts for x in p.top_logprobs]
    return Output(text="".join(p.text for p in parts),
                  token_ids=[t for p in parts for t in p.token_ids], logprobs=logprobs,
                  finish_reason=parts[-1].finish_reason, timings=parts[-1].timings,
                  top_logprobs=top)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
