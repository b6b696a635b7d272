"""Completions: from a validated request to engine sequences, and their outputs back to a
JSON response or a stream of server-sent events.

`echo` with `logprobs` scores the prompt: its tokens come first in `logprobs` (the first
token's log-probability is null: nothing predicts it), then the generated ones, with
`text_offset` counting characters of the returned text; `max_tokens` 0 then returns only
the scored prompt.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from lm.engine import Output
from lm.fewshot import DEFAULT_TEMPLATE, Example, build_prompt
from lm.generate import encode_prompt
from service import jobs
from service.errors import APIError
from service.jobs import Job
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
        raise APIError(
            400, f"{param}: at most {settings.max_prompts} texts per request", param=param
        )
    return texts


def check_lengths(texts: list[str], param: str, settings: Settings) -> None:
    """Every text non-empty and within the size limit (413 beyond it)."""
    for text in texts:
        if not text:
            raise APIError(400, f"{param}: must not be empty", param=param)
        if len(text) > settings.max_prompt_chars:
            raise APIError(
                413,
                f"{param}: longer than {settings.max_prompt_chars} characters",
                param=param,
                code="prompt_too_long",
            )


def token_prompts(prompt, settings: Settings) -> list[list[int]] | None:
    """The prompt as lists of token ids when it was given as ids, else None."""
    if not isinstance(prompt, list) or not prompt or isinstance(prompt[0], str):
        return None
    lists = [prompt] if isinstance(prompt[0], int) else prompt
    if len(lists) > settings.max_prompts:
        raise APIError(
            400, f"prompt: at most {settings.max_prompts} prompts per request", param="prompt"
        )
    for ids in lists:
        if not ids:
            raise APIError(400, "prompt: a token list must not be empty", param="prompt")
        if len(ids) > settings.max_prompt_chars:  # a token is at least a character
            raise APIError(
                413,
                f"prompt: longer than {settings.max_prompt_chars} tokens",
                param="prompt",
                code="prompt_too_long",
            )
    return [list(ids) for ids in lists]


def prepare(body: CompletionRequest, served: ServedModel, settings: Settings):
    """Check a request against the server's limits; build prompts, ids and parameters."""
    prompt_ids = token_prompts(body.prompt, settings)
    if prompt_ids is not None:
        prompts = None
    else:
        prompts = text_list(body.prompt, "prompt", settings)
    count = len(prompt_ids if prompt_ids is not None else prompts)
    if body.n * count > settings.max_n:
        raise APIError(
            400,
            f"n: at most {settings.max_n} completions per request "
            f"(prompts x n), got {body.n * count}",
            param="n",
        )
    params = body.to_sampling_params(settings)
    if body.examples is not None or body.template is not None:
        if prompts is None:
            raise APIError(
                400,
                "examples: few-shot requests take a text prompt, not token ids",
                param="examples",
            )
        if not body.examples:
            raise APIError(
                400,
                "examples: at least one example is needed for a few-shot request",
                param="examples",
            )
        examples = [Example(e.input, e.output) for e in body.examples]
        built = []
        for query in prompts:
            text, default_stop = build_prompt(examples, query, body.template or DEFAULT_TEMPLATE)
            built.append(text)
        prompts = built
        params.stop = params.stop or default_stop
    if prompts is not None:
        check_lengths(prompts, "prompt", settings)
        prompt_ids = [encode_prompt(served.checkpoint, text) for text in prompts]
    else:
        tokenizer = served.checkpoint.tokenizer
        vocab = served.engine.vocab_size
        if any(not 0 <= t < vocab for ids in prompt_ids for t in ids):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        prompts = [tokenizer.decode(ids) for ids in prompt_ids]
    return params, prompts, prompt_ids


def submit(
    body: CompletionRequest,
    served: ServedModel,
    settings: Settings,
    metrics: Metrics,
    request_id: str,
) -> tuple[Job, list[str]]:
    params, prompts, prompt_ids = prepare(body, served, settings)
    job = jobs.submit(
        served, f"cmpl-{request_id}", prompt_ids, params, body.n, body.stream, metrics
    )
    return job, prompts


def _logprobs(
    job: Job, body: CompletionRequest, choice: int, out: Output, offset: int
) -> Logprobs | None:
    """The generated tokens' log-probabilities, their text starting at `offset`."""
    if body.logprobs is None or out.logprobs is None:
        return None
    pieces = job.pieces(choice, out.token_ids)
    context = list(job.prompt_ids[choice // job.n])
    tops = []
    for index in range(len(out.token_ids)):
        row = out.top_logprobs[index] if out.top_logprobs is not None else []
        names = context + out.token_ids[:index]
        tops.append({jobs.token_text(job.tokenizer, names, t): v for t, v in row})
    return Logprobs(
        tokens=pieces,
        token_logprobs=list(out.logprobs),
        top_logprobs=tops if body.logprobs > 0 else None,
        text_offset=_offsets(pieces, offset),
    )


def _prompt_logprobs(
    job: Job, body: CompletionRequest, choice: int, out: Output
) -> tuple[str, Logprobs]:
    """The echoed prompt (as the model read it) and its tokens' log-probabilities."""
    ids = job.prompt_ids[choice // job.n]
    pieces = jobs.prompt_pieces(job.tokenizer, ids)
    tops: list[dict[str, float] | None] = [None]
    for index in range(1, len(ids)):
        row = (out.prompt_top_logprobs or [])[index] or []
        tops.append({jobs.token_text(job.tokenizer, ids[:index], t): v for t, v in row})
    return "".join(pieces), Logprobs(
        tokens=pieces,
        token_logprobs=list(out.prompt_logprobs or [None] * len(ids)),
        top_logprobs=tops if body.logprobs > 0 else None,
        text_offset=_offsets(pieces, 0),
    )


def _offsets(pieces: list[str], start: int) -> list[int]:
    offsets, position = [], start
    for piece in pieces:
        offsets.append(position)
        position += len(piece)
    return offsets


def _join(first: Logprobs, second: Logprobs | None) -> Logprobs:
    if second is None:
        return first
    top = None
    if first.top_logprobs is not None and second.top_logprobs is not None:
        top = first.top_logprobs + second.top_logprobs
    return Logprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=top,
        text_offset=first.text_offset + second.text_offset,
    )


async def complete(
    job: Job, body: CompletionRequest, prompts: list[str], request: Request, metrics: Metrics
) -> CompletionResponse | Response:
    try:
        outputs = await jobs.collect(job, request, metrics)
    except jobs.ClientGone:
        return Response(status_code=499)  # nginx's "client closed request"
    choices = []
    scoring = body.echo and body.logprobs is not None
    for choice, out in enumerate(outputs):
        prefix = prompts[choice // body.n] if body.echo else ""
        if scoring:
            prefix, prompt_logprobs = _prompt_logprobs(job, body, choice, out)
            logprobs = _join(prompt_logprobs, _logprobs(job, body, choice, out, len(prefix)))
        else:
            logprobs = _logprobs(job, body, choice, out, len(prefix))
        choices.append(
            CompletionChoice(
                text=prefix + out.text,
                index=choice,
                logprobs=logprobs,
                finish_reason=jobs.finish_reason(out),
            )
        )
    return CompletionResponse(
        id=job.request_id,
        created=job.created,
        model=job.served.name,
        choices=choices,
        usage=Usage(**job.usage()),
    )


async def stream(
    job: Job, body: CompletionRequest, prompts: list[str], metrics: Metrics
) -> AsyncIterator[str]:
    offsets = [0] * len(job.sequences)
    scoring = body.echo and body.logprobs is not None
    echoed = [False] * len(job.sequences)
    async for batch in jobs.events(job, metrics):
        chunks = []
        for choice, out in batch:
            if body.echo and not echoed[choice]:  # the prompt first (scored, with logprobs)
                echoed[choice] = True
                prefix, logprobs = prompts[choice // body.n], None
                if scoring:
                    prefix, logprobs = _prompt_logprobs(job, body, choice, out)
                offsets[choice] = len(prefix)
                chunks.append(_sse(job, choice, prefix, logprobs, None))
            if out.finish_reason == "error":
                chunks.append(f"data: {json.dumps(jobs.error_event(out))}\n\n")
                continue
            finish = jobs.finish_reason(out) if out.finish_reason is not None else None
            if out.text or finish is not None or (out.logprobs and out.token_ids):
                logprobs = _logprobs(job, body, choice, out, offsets[choice])
                chunks.append(_sse(job, choice, out.text, logprobs, finish))
            offsets[choice] += len(out.text)
        if chunks:
            yield "".join(chunks)
    if body.stream_options is not None and body.stream_options.include_usage:
        chunk = {
            "id": job.request_id,
            "object": "text_completion",
            "created": job.created,
            "model": job.served.name,
            "choices": [],
            "usage": job.usage(),
        }
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def _sse(job: Job, choice: int, text: str, logprobs: Logprobs | None, finish: str | None) -> str:
    chunk = {
        "id": job.request_id,
        "object": "text_completion",
        "created": job.created,
        "model": job.served.name,
        "choices": [
            {
                "text": text,
                "index": choice,
                "logprobs": logprobs.model_dump() if logprobs else None,
                "finish_reason": finish,
            }
        ],
    }
    return f"data: {json.dumps(chunk)}\n\n"
