"""POST /v1/chat/completions, and POST /v1/chat/render (the prompt a chat request becomes)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service import chat as serving
from service.deps import chat_model, check_key, get_metrics, get_settings
from service.loader import ServedModel
from service.metrics import Metrics
from service.middleware import request_id
from service.routes.completions import SSE_EVENT
from service.schemas import ChatRender, ChatRequest, ChatResponse, ErrorResponse
from service.settings import Settings

router = APIRouter(dependencies=[Depends(check_key)])

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}
_RESPONSES = {
    200: {
        "content": {"text/event-stream": {"itemSchema": SSE_EVENT}},
        "description": "a chat completion; with `stream`, server-sent events instead",
    },
    **_ERRORS,
}


@router.post("/v1/chat/completions", response_model=ChatResponse, responses=_RESPONSES)
async def chat_completions(
    body: ChatRequest,
    request: Request,
    served: ServedModel = Depends(chat_model),
    settings: Settings = Depends(get_settings),
    metrics: Metrics = Depends(get_metrics),
):
    job = serving.submit(body, served, settings, metrics, request_id(request))
    if body.stream:
        return StreamingResponse(
            serving.stream(job, body, metrics),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await serving.complete(job, request, metrics)


@router.post("/v1/chat/render", response_model=ChatRender, responses=_ERRORS)
async def chat_render(
    body: ChatRequest,
    served: ServedModel = Depends(chat_model),
    settings: Settings = Depends(get_settings),
):
    """The prompt (and added stop sequences) a chat request becomes; generates nothing."""
    prompt = serving.render(body.message_dicts(), served, body.add_generation_prompt, settings)
    return ChatRender(model=served.name, prompt=prompt, stop=served.chat_template.stop)
