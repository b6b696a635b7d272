"""Faults the server must never pass silently: a request whose logits turn NaN (500 or an
SSE error event, its neighbours in the batch unharmed, counted in /metrics), an engine
failure, and clients that stall in the middle of their request body."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from lm.checkpoint import load_checkpoint
from service.app import create_app
from service.settings import Settings

POISONED_POSITION = 60
HEALTHY = "The king speaks of"  # 18 characters + 40 tokens: never reaches position 60
POISONED = "The king speaks of the quiet sea, and my good lord defends it."  # 62


@pytest.fixture(scope="module")
def poisoned_server(tiny_checkpoint_dir, launch):
    """"tiny" with its position embedding 60 set to NaN: every sequence that reaches 60
    tokens gets NaN logits, no other (what a fault in memory does at run time, after
    loading validated the weights)."""
    import torch

    checkpoint = load_checkpoint(tiny_checkpoint_dir)
    with torch.no_grad():
        checkpoint.model.wpe.weight[POISONED_POSITION] = float("nan")
    settings = Settings(checkpoints=[str(tiny_checkpoint_dir)])
    return launch(create_app(settings, [checkpoint]))


assert len(POISONED) == 62  # past position 60, inside the 64-token context: no window shift


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def events(body: str) -> list[dict | str]:
    data = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def test_nonfinite_logits_fail_that_request_only_and_are_counted(poisoned_server):
    url = poisoned_server.url
    series = 'lm:nonfinite_logits_total{model_name="tiny"}'
    before = scrape(url).get(series, 0.0)

    async def send_together():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            def post(prompt: str, **extra):
                return client.post("/v1/completions", json={
                    "model": "tiny", "prompt": prompt, "max_tokens": 40, "seed": 1, **extra})

            return await asyncio.gather(post(HEALTHY), post(POISONED), post(HEALTHY, n=2),
                                        post(POISONED, stream=True), post(HEALTHY, stream=True))

    healthy, bad, healthy_n, bad_stream, healthy_stream = asyncio.run(send_together())

    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "nonfinite_logits"
    assert "not finite (NaN or infinite logits) at generated token 1" in error["message"]

    assert bad_stream.status_code == 200  # the stream had begun: the error is an event
    sent = events(bad_stream.text)
    [failure] = [e for e in sent if isinstance(e, dict) and "error" in e]
    assert failure["error"]["code"] == "nonfinite_logits"
    assert not [e for e in sent if isinstance(e, dict) and e.get("choices")
                and e["choices"][0]["finish_reason"] in ("stop", "length")]

    for response in (healthy, healthy_n):
        assert response.status_code == 200, response.text
        body = response.json()
        assert [c["finish_reason"] for c in body["choices"]] == ["length"] * len(body["choices"])
        assert body["usage"]["completion_tokens"] == 40 * len(body["choices"])
    streamed = events(healthy_stream.text)
    assert streamed[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == healthy.json()[
        "choices"][0]["text"]

    after = scrape(url)
    assert after[series] - before == 2
    assert after['vllm:num_requests_running{model_name="tiny"}'] == 0
    health = httpx.get(f"{url}/health", timeout=10)
    assert health.status_code == 200  # one request's numbers are not the server's health
