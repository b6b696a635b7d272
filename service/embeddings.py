"""Embeddings: texts -> the mean of the model's final hidden states over each one's tokens."""

from __future__ import annotations

import base64

from starlette.concurrency import run_in_threadpool

from lm.embeddings import mean_hidden_embedding
from service.completions import check_lengths, text_list
from service.errors import APIError
from service.loader import ServedModel
from service.schemas import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from service.settings import Settings


async def embed(
    body: EmbeddingRequest, served: ServedModel, settings: Settings
) -> EmbeddingResponse:
    """Check the inputs against the server's limits and embed them off the event loop."""
    texts = text_list(body.input, "input", settings)
    check_lengths(texts, "input", settings)
    ids = [served.checkpoint.tokenizer.encode(text) for text in texts]
    if any(not seq for seq in ids):
        raise APIError(400, "input: a text encodes to no tokens", param="input")
    vectors = await run_in_threadpool(mean_hidden_embedding, served.checkpoint.model, ids)
    data = []
    for index, vector in enumerate(vectors):
        if body.encoding_format == "base64":
            encoded = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
            data.append(Embedding(embedding=encoded, index=index))
        else:
            data.append(Embedding(embedding=vector.tolist(), index=index))
    tokens = sum(len(seq) for seq in ids)
    return EmbeddingResponse(
        data=data,
        model=served.name,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
