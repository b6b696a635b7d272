"""GET /metrics: Prometheus text, open without the API key."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import get_metrics
from service.metrics import Metrics

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(metrics: Metrics = Depends(get_metrics)):
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
