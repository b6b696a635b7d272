"""GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.deps import check_key
from service.schemas import ErrorResponse, ModelCard, ModelList

router = APIRouter(dependencies=[Depends(check_key)])


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
async def list_models(request: Request):
    return ModelList(
        data=[
            ModelCard(
                id=m.name,
                created=m.created,
                kind=m.checkpoint.config.kind,
                tokenizer=m.checkpoint.tokenizer.kind,
                num_params=m.checkpoint.model.num_params(),
                context_size=m.checkpoint.model.context_size,
                parent=m.parent,
            )
            for m in request.app.state.models.values()
        ]
    )
