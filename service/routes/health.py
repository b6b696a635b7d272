"""GET /health: open without the API key; 503 while draining."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.schemas import Health

router = APIRouter()


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health, "description": "shutting down"}},
)
async def health(request: Request):
    models, draining = request.app.state.models, request.app.state.draining
    body = Health(
        status="draining" if draining else "ok",
        models=list(models),
        running=sum(m.engine.num_running for m in models.values() if not m.adapter),
        waiting=sum(m.engine.num_waiting for m in models.values() if not m.adapter),
    )
    return JSONResponse(body.model_dump(), status_code=503 if draining else 200)
