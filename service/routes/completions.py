"""POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service import completions as serving
from service.deps import check_key, completion_model, get_metrics, get_settings
from service.loader import ServedModel
from service.metrics import Metrics
from service.schemas import CompletionRequest, CompletionResponse, ErrorResponse
from service.settings import Settings

router = APIRouter(dependencies=[Depends(check_key)])

# One server-sent event of a streamed completion (FastAPI's own notation for event streams).
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a completion chunk as JSON; `[DONE]` at the end",
        },
    },
}
_RESPONSES = {
    200: {
        "content": {"text/event-stream": {"itemSchema": _SSE_EVENT}},
        "description": "a completion; with `stream`, server-sent events instead",
    },
    **{code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)},
}


@router.post("/v1/completions", response_model=CompletionResponse, responses=_RESPONSES)
async def completions(
    body: CompletionRequest,
    request: Request,
    served: ServedModel = Depends(completion_model),
    settings: Settings = Depends(get_settings),
    metrics: Metrics = Depends(get_metrics),
):
    job = serving.submit(body, served, settings, metrics)
    if body.stream:
        return StreamingResponse(
            serving.stream(job, metrics),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await serving.complete(job, request, metrics)
