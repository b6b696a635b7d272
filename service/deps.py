"""FastAPI dependencies: the API key check and the lookups routes need from app.state.

Each is `async def`: none blocks, and FastAPI runs a plain `def` dependency in its thread
pool, a hand-off to a worker thread and back for every dependency of every request."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import APIError
from service.loader import ServedModel
from service.metrics import Metrics
from service.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def check_key(request: Request) -> None:
    """401 unless the request carries the server's API key (when it has one)."""
    api_key = request.app.state.settings.api_key
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    expected = api_key.get_secret_value()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected.encode()):
        raise APIError(
            401,
            "missing or wrong API key (send 'Authorization: Bearer KEY')",
            code="invalid_api_key",
        )


def find_model(request: Request, name: str | None) -> ServedModel:
    """The served model called `name` (the first one when None); 404 naming `model`."""
    models: dict[str, ServedModel] = request.app.state.models
    if name is None:
        return next(iter(models.values()))
    if name not in models:
        raise APIError(
            404,
            f"model {name!r} not found; served: {', '.join(models)}",
            param="model",
            code="model_not_found",
        )
    return models[name]


async def completion_model(body: CompletionRequest, request: Request) -> ServedModel:
    return find_model(request, body.model)


async def embedding_model(body: EmbeddingRequest, request: Request) -> ServedModel:
    served = find_model(request, body.model)
    if served.adapter:
        raise APIError(
            400,
            f"model {served.name!r} is a LoRA adapter: embeddings come from "
            f"base models only (use {served.parent!r})",
            param="model",
        )
    return served


async def chat_model(body: ChatRequest, request: Request) -> ServedModel:
    return find_model(request, body.model)


async def tokenize_model(body: TokenizeRequest, request: Request) -> ServedModel:
    return find_model(request, body.model)


async def detokenize_model(body: DetokenizeRequest, request: Request) -> ServedModel:
    return find_model(request, body.model)
