"""Prompt log-probabilities (`echo` with `logprobs`), token-id prompts, penalties and logit
bias through the server, and the engine's prompt scoring against the model's forward."""

from __future__ import annotations

import httpx
import pytest
import torch

from lm.checkpoint import load_checkpoint
from lm.engine import Engine
from lm.sampling import SamplingParams

PROMPT = "The king speaks of the sea"


@pytest.fixture(scope="module")
def server(live_server):
    return live_server


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_dir):
    return load_checkpoint(tiny_checkpoint_dir)


def post(server, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": "tiny", **body}, timeout=60)


def reference(checkpoint, ids: list[int]) -> list[float]:
    """log_softmax(model.forward(ids)) gathered at the next tokens."""
    with torch.no_grad():
        logits = checkpoint.model(torch.tensor([ids]))[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def test_engine_scores_the_prompt_as_forward_does(checkpoint):
    ids = checkpoint.tokenizer.encode(PROMPT)
    engine = Engine(checkpoint.model, checkpoint.tokenizer, max_batch=2)
    seq = engine.submit(ids, SamplingParams(max_new_tokens=0, prompt_logprobs=2))
    engine.run_until_idle()
    [out] = seq.outputs
    assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] is None
    assert out.prompt_logprobs[1:] == pytest.approx(reference(checkpoint, ids), abs=1e-5)
    assert all(len(top) == 2 for top in out.prompt_top_logprobs[1:])
    assert seq.generated == [] and out.finish_reason == "length"


def test_echo_logprobs_scores_prompt_then_generated(server, checkpoint):
    ids = checkpoint.tokenizer.encode(PROMPT)
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0}
    r = post(server, body)
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    logprobs = choice["logprobs"]
    n = len(ids)
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == n + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:n] == pytest.approx(reference(checkpoint, ids), abs=1e-4)
    # Each prompt position's top entry is the most likely token there (greedy: the next token
    # generated after the prompt is the top one at the first generated position).
    for value, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
        assert len(top) == 1 and max(top.values()) >= value - 1e-6
    assert logprobs["token_logprobs"][n] == pytest.approx(max(logprobs["top_logprobs"][n].values()))
    # Offsets count characters of the returned text, whose pieces are the tokens.
    text = choice["text"]
    assert text.startswith(PROMPT)
    for offset, token in zip(logprobs["text_offset"], logprobs["tokens"]):
        assert text[offset : offset + len(token)] == token
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"][n] == len(PROMPT)


def test_max_tokens_zero_scores_only_the_prompt(server, checkpoint):
    ids = checkpoint.tokenizer.encode(PROMPT)
    r = post(server, {"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    [choice] = body["choices"]
    assert choice["text"] == PROMPT
    assert choice["logprobs"]["top_logprobs"] is None
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        reference(checkpoint, ids), abs=1e-4
    )
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "total_tokens": len(ids),
    }


def test_streamed_echo_logprobs_equal_the_response(server):
    body = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0}
    whole = post(server, body).json()["choices"][0]
    tokens, values, text = [], [], ""
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                import json

                chunk = json.loads(line[6:])["choices"][0]
                text += chunk["text"]
                if chunk["logprobs"]:
                    tokens += chunk["logprobs"]["tokens"]
                    values += chunk["logprobs"]["token_logprobs"]
    assert text == whole["text"]
    assert tokens == whole["logprobs"]["tokens"]
    assert values == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-6)


def test_token_id_prompts_equal_text_prompts(server, checkpoint):
    ids = checkpoint.tokenizer.encode(PROMPT)
    by_text = post(server, {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}).json()
    by_ids = post(server, {"prompt": [ids, ids[:-1]], "max_tokens": 6, "temperature": 0}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert len(by_ids["choices"]) == 2
    assert by_ids["usage"]["prompt_tokens"] == 2 * len(ids) - 1


def test_prompt_scoring_beyond_the_context_is_a_400(server):
    r = post(server, {"prompt": "x" * 200, "echo": True, "logprobs": 0, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_logit_bias_forces_and_bans_tokens(server, checkpoint):
    token = checkpoint.tokenizer.encode("q")[0]
    r = post(server, {"prompt": PROMPT, "max_tokens": 5, "logit_bias": {str(token): 100}})
    assert r.json()["choices"][0]["text"] == "q" * 5
    greedy = post(server, {"prompt": PROMPT, "max_tokens": 1, "temperature": 0}).json()
    first = checkpoint.tokenizer.encode(greedy["choices"][0]["text"])[0]
    banned = post(
        server,
        {"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logit_bias": {str(first): -100}},
    ).json()
    assert banned["choices"][0]["text"] != greedy["choices"][0]["text"]


def test_penalties_change_greedy_output_only_when_used(server):
    base = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    plain = post(server, base).json()["choices"][0]["text"]
    neutral = post(
        server, {**base, "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1}
    ).json()["choices"][0]["text"]
    assert neutral == plain
    penalized = post(server, {**base, "frequency_penalty": 2.0}).json()["choices"][0]["text"]
    assert penalized != plain
    # A strong frequency penalty spreads the text over more distinct characters.
    assert len(set(penalized)) >= len(set(plain))


def test_request_id_echoed_or_made(server):
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "We", "max_tokens": 1},
        headers={"X-Request-Id": "abc-123"},
        timeout=30,
    )
    assert r.headers["x-request-id"] == "abc-123"
    assert r.json()["id"] == "cmpl-abc-123"
    made = httpx.get(f"{server.url}/v1/nothing", timeout=30).headers["x-request-id"]
    assert len(made) == 32


def test_request_id_is_logged_with_the_request(server, caplog):
    import time

    with caplog.at_level("INFO", logger="service.requests"):
        httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "We", "max_tokens": 1},
            headers={"X-Request-Id": "log-me-7"},
            timeout=30,
        )
        deadline = time.monotonic() + 5  # logged just after the response's last byte
        while time.monotonic() < deadline:
            lines = [r.getMessage() for r in caplog.records if "log-me-7" in r.getMessage()]
            if lines:
                break
            time.sleep(0.01)
    assert len(lines) == 1 and "POST /v1/completions -> 200" in lines[0]
