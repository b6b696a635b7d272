"""Chat completions: messages rendered by the model's chat template into one prompt, then
generated as a completion and returned in OpenAI's chat shapes (a response, or chunks:
the role first, then content deltas, a finish_reason chunk, usage if asked, [DONE])."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from lm.engine import Output
from lm.sampling import SamplingParams
from service import jobs
from service.completions import check_lengths
from service.errors import APIError
from service.jobs import Job
from service.loader import ServedModel
from service.metrics import Metrics
from service.schemas import (
    ChatChoice,
    ChatLogprobs,
    ChatRequest,
    ChatResponse,
    ChatResponseMessage,
    Usage,
)
from service.settings import Settings


def render(
    messages: list[dict], served: ServedModel, add_generation_prompt: bool, settings: Settings
) -> str:
    """The prompt the model reads for `messages`, within the server's size limit."""
    prompt = served.chat_template.render(messages, add_generation_prompt)
    check_lengths([prompt], "messages", settings)
    return prompt


def prepare(
    body: ChatRequest, served: ServedModel, settings: Settings
) -> tuple[SamplingParams, list[int]]:
    if body.n > settings.max_n:
        raise APIError(400, f"n: at most {settings.max_n} completions per request", param="n")
    params = body.to_sampling_params(settings)
    prompt = render(body.message_dicts(), served, body.add_generation_prompt, settings)
    params.stop = params.stop + [s for s in served.chat_template.stop if s not in params.stop]
    ids = served.checkpoint.tokenizer.encode(prompt)
    if not ids:
        raise APIError(400, "messages: the rendered prompt holds no tokens", param="messages")
    return params, ids


def submit(
    body: ChatRequest, served: ServedModel, settings: Settings, metrics: Metrics, request_id: str
) -> Job:
    params, ids = prepare(body, served, settings)
    return jobs.submit(
        served, f"chatcmpl-{request_id}", [ids], params, body.n, body.stream, metrics
    )


def _logprobs(job: Job, choice: int, out: Output) -> ChatLogprobs | None:
    if out.logprobs is None:
        return None
    pieces = job.pieces(choice, out.token_ids)
    context = job.prompt_ids[0]
    content = []
    for index, (piece, value) in enumerate(zip(pieces, out.logprobs)):
        names = context + out.token_ids[:index]
        top = [
            {
                "token": (name := jobs.token_text(job.tokenizer, names, t)),
                "logprob": v,
                "bytes": list(name.encode()),
            }
            for t, v in (out.top_logprobs or [[]] * len(out.token_ids))[index]
        ]
        content.append(
            {"token": piece, "logprob": value, "bytes": list(piece.encode()), "top_logprobs": top}
        )
    return ChatLogprobs(content=content)


async def complete(job: Job, request: Request, metrics: Metrics) -> ChatResponse | Response:
    try:
        outputs = await jobs.collect(job, request, metrics)
    except jobs.ClientGone:
        return Response(status_code=499)
    choices = [
        ChatChoice(
            index=choice,
            message=ChatResponseMessage(content=out.text),
            logprobs=_logprobs(job, choice, out),
            finish_reason=jobs.finish_reason(out),
        )
        for choice, out in enumerate(outputs)
    ]
    return ChatResponse(
        id=job.request_id,
        created=job.created,
        model=job.served.name,
        choices=choices,
        usage=Usage(**job.usage()),
    )


async def stream(job: Job, body: ChatRequest, metrics: Metrics) -> AsyncIterator[str]:
    yield "".join(
        _chunk(
            job,
            [
                {
                    "index": choice,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        )
        for choice in range(len(job.sequences))
    )
    async for batch in jobs.events(job, metrics):
        chunks = []
        for choice, out in batch:
            if out.finish_reason == "error":
                chunks.append(f"data: {json.dumps(jobs.error_event(out))}\n\n")
                continue
            if out.text or (out.logprobs and out.token_ids):
                logprobs = _logprobs(job, choice, out)
                chunks.append(
                    _chunk(
                        job,
                        [
                            {
                                "index": choice,
                                "delta": {"content": out.text},
                                "logprobs": logprobs.model_dump() if logprobs else None,
                                "finish_reason": None,
                            }
                        ],
                    )
                )
            if out.finish_reason is not None:
                chunks.append(
                    _chunk(
                        job,
                        [
                            {
                                "index": choice,
                                "delta": {},
                                "logprobs": None,
                                "finish_reason": jobs.finish_reason(out),
                            }
                        ],
                    )
                )
        if chunks:
            yield "".join(chunks)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield _chunk(job, [], usage=job.usage())
    yield "data: [DONE]\n\n"


def _chunk(job: Job, choices: list[dict], usage: dict | None = None) -> str:
    chunk = {
        "id": job.request_id,
        "object": "chat.completion.chunk",
        "created": job.created,
        "model": job.served.name,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return f"data: {json.dumps(chunk)}\n\n"
