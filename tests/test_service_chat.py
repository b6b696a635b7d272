"""Chat completions through the official `openai` client, the rendered prompt, vLLM's
tokenize routes, and how an engine failure reaches the client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from lm.chat import ChatTemplate
from lm.checkpoint import load_checkpoint
from service.app import create_app
from service.settings import Settings

MESSAGES = [{"role": "system", "content": "Speak well."}, {"role": "user", "content": "The king"}]


@pytest.fixture(scope="module")
def server(live_server):
    return live_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


def completion_text(server, prompt: str, **kwargs) -> str:
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tiny", "prompt": prompt, **kwargs},
        timeout=60,
    )
    return r.json()["choices"][0]["text"]


def test_chat_is_the_completion_of_the_rendered_prompt(client, server):
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0
    )
    [choice] = reply.choices
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    prompt = ChatTemplate().render(MESSAGES)
    expected = completion_text(server, prompt, max_tokens=12, temperature=0, stop=["\nUser:"])
    assert choice.message.content == expected
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(prompt)  # the tiny model reads characters


def test_chat_stream_shapes_and_text(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0.8, seed=5, n=2)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    texts, roles, finishes = ["", ""], [[], []], [[], []]
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            if c.delta.role:
                roles[c.index].append(c.delta.role)
                assert not texts[c.index]  # the role comes first
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index].append(c.finish_reason)
                assert c.delta.content is None
    assert roles == [["assistant"], ["assistant"]]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [[c.finish_reason] for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_chat_stop_seed_and_logprobs(client):
    kwargs = dict(
        model="tiny", messages=MESSAGES, max_tokens=8, seed=11, logprobs=True, top_logprobs=3
    )
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert first.choices[0].message.content == again.choices[0].message.content
    content = first.choices[0].logprobs.content
    assert (
        "".join(t.token for t in content) == first.choices[0].message.content
        or first.choices[0].finish_reason == "stop"
    )
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    text = first.choices[0].message.content
    if text:
        stopped = client.chat.completions.create(**{**kwargs, "stop": [text[-1]]})
        assert stopped.choices[0].finish_reason == "stop"
        assert text[-1] not in stopped.choices[0].message.content


def test_chat_refuses_what_it_does_not_do(server):
    for extra, param in [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"stream": "yes"}, "stream"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"messages": []}, "messages"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "messages",
        ),
    ]:
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 2, **extra},
            timeout=30,
        )
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.text)
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=30,
        json={
            "messages": MESSAGES,
            "user": "me",
            "metadata": {"a": "b"},
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "max_tokens": None,
        },
    )
    assert r.status_code == 200, r.text


def test_render_shows_the_prompt(server):
    r = httpx.post(f"{server.url}/v1/chat/render", json={"messages": MESSAGES}, timeout=30)
    assert r.status_code == 200
    assert r.json() == {
        "model": "tiny",
        "prompt": ChatTemplate().render(MESSAGES),
        "stop": ["\nUser:"],
    }


def test_tokenize_and_detokenize(server, tiny_checkpoint_dir):
    tokenizer = load_checkpoint(tiny_checkpoint_dir).tokenizer
    r = httpx.post(f"{server.url}/tokenize", json={"model": "tiny", "prompt": "The king"})
    assert r.json() == {
        "count": 8,
        "max_model_len": 64,
        "tokens": tokenizer.encode("The king"),
        "token_strs": None,
    }
    r = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES})
    assert r.json()["tokens"] == tokenizer.encode(ChatTemplate().render(MESSAGES))
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": tokenizer.encode("The king")})
    assert r.json() == {"prompt": "The king"}
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [-1]}).status_code == 400
    assert httpx.post(f"{server.url}/tokenize", json={}).status_code == 400
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["chat_template"] == ChatTemplate().source
    assert info["model_max_length"] == 64 and info["eos_token"] is None


def test_tokenize_routes_need_the_key(start_server):
    keyed = start_server(api_key="k")
    for method, path in [
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("GET", "/tokenizer_info"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat/render"),
    ]:
        assert httpx.request(method, f"{keyed.url}{path}", json={}).status_code == 401
    r = httpx.get(f"{keyed.url}/tokenizer_info", headers={"Authorization": "Bearer k"})
    assert r.status_code == 200
    keyed.stop()


class Failing(Exception):
    pass


@pytest.fixture
def failing_server(tiny_checkpoint_dir, launch):
    """A server whose model raises after its prefill: every generation fails mid-way."""
    checkpoint = load_checkpoint(tiny_checkpoint_dir)
    real_step = checkpoint.model.step

    def step(ids, state):
        if ids.shape[1] == 1:  # a decode step
            raise Failing("the model broke")
        return real_step(ids, state)

    checkpoint.model.step = step
    settings = Settings(checkpoints=[str(tiny_checkpoint_dir)])
    return launch(create_app(settings, [checkpoint]))


def test_engine_failure_is_a_500_or_an_error_event(failing_server):
    url = failing_server.url
    for path, body in [
        ("/v1/completions", {"prompt": "The king", "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4}),
    ]:
        r = httpx.post(f"{url}{path}", json=body, timeout=30)
        assert r.status_code == 500, r.text
        assert r.json()["error"]["type"] == "server_error"
        with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=30) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "engine_error"
        finishes = [c.get("finish_reason") for e in events for c in e.get("choices", [])]
        assert not any(finishes), events  # never a normal finish
    assert httpx.get(f"{url}/health").status_code == 200  # the server itself keeps serving


def test_a_failing_prompt_scoring_is_a_500(tiny_checkpoint_dir, launch):
    checkpoint = load_checkpoint(tiny_checkpoint_dir)

    def forward(ids):
        raise Failing("the model broke")

    checkpoint.model.forward = forward
    server = launch(create_app(Settings(checkpoints=[str(tiny_checkpoint_dir)]), [checkpoint]))
    body = {"prompt": "The king", "echo": True, "logprobs": 1, "max_tokens": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    assert (
        httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "We", "max_tokens": 2},  # still serving
            timeout=30,
        ).status_code
        == 200
    )
