"""POST /v1/embeddings: OpenAI-shaped, deterministic, the mean of the final hidden states."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch

from lm.checkpoint import load_checkpoint
from lm.embeddings import mean_hidden_embedding


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="x", max_retries=0, timeout=30)


def test_shapes_and_usage(client, tiny_checkpoint_dir):
    checkpoint = load_checkpoint(tiny_checkpoint_dir)
    result = client.embeddings.create(model="tiny", input=["The king", "speaks of war"])
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == checkpoint.config.n_embd for d in result.data)
    tokens = len(checkpoint.tokenizer.encode("The king")) + len(
        checkpoint.tokenizer.encode("speaks of war")
    )
    assert result.usage.prompt_tokens == tokens == result.usage.total_tokens


def test_equals_the_mean_hidden_state_and_is_deterministic(client, tiny_checkpoint_dir):
    checkpoint = load_checkpoint(tiny_checkpoint_dir)
    ids = checkpoint.tokenizer.encode("The king")
    expected = checkpoint.model.hidden(torch.tensor([ids])).mean(dim=1)[0]
    default = client.embeddings.create(model="tiny", input="The king").data[0].embedding
    plain = (
        client.embeddings.create(model="tiny", input="The king", encoding_format="float")
        .data[0]
        .embedding
    )
    packed = (
        client.embeddings.create(model="tiny", input="The king", encoding_format="base64")
        .data[0]
        .embedding
    )
    unpacked = np.frombuffer(base64.b64decode(packed), dtype="<f4").tolist()
    for vector in (default, plain, unpacked):  # the client asks base64 and decodes it itself
        torch.testing.assert_close(torch.tensor(vector), expected, atol=1e-5, rtol=1e-5)
    batched = mean_hidden_embedding(
        checkpoint.model, [ids, checkpoint.tokenizer.encode("a longer text")]
    )
    torch.testing.assert_close(batched[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "tiny", "input": ""}, 400, "input"),
        ({"model": "tiny", "input": []}, 400, "input"),
        ({"model": "tiny", "input": ["ok", ""]}, 400, "input"),
        ({"model": "nope", "input": "x"}, 404, "model"),
        ({"model": "tiny"}, 400, "input"),
        ({"model": "tiny", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ],
)
def test_bad_requests(live_server, body, status, param):
    response = httpx.post(f"{live_server.url}/v1/embeddings", json=body, timeout=10)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param
