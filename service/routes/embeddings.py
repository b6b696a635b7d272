"""POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service import embeddings as serving
from service.deps import check_key, embedding_model, get_settings
from service.loader import ServedModel
from service.schemas import EmbeddingRequest, EmbeddingResponse, ErrorResponse
from service.settings import Settings

router = APIRouter(dependencies=[Depends(check_key)])


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413)},
)
async def embeddings(
    body: EmbeddingRequest,
    served: ServedModel = Depends(embedding_model),
    settings: Settings = Depends(get_settings),
):
    """The mean of the model's final hidden states over each input's tokens."""
    return await serving.embed(body, served, settings)
