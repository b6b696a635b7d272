"""Bad requests get the right status and an OpenAI error body that names the field; nothing
a client sends produces a 5xx or stops the server."""

from __future__ import annotations

import json

import httpx
import pytest

LIMITS = {
    "max_tokens_limit": 64,
    "max_n": 4,
    "max_prompt_chars": 500,
    "max_body_bytes": 4096,
    "max_stop": 4,
    "max_stop_chars": 16,
}
OK = {"prompt": "The king", "max_tokens": 3}

statuses: list[int] = []  # every status this module saw, checked by the last test


@pytest.fixture(scope="module")
def server(start_server):
    server = start_server(**LIMITS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed_server(start_server):
    server = start_server(api_key="s3cret")
    yield server
    server.stop()


def post(server, body=None, *, content=None, headers=None, path="/v1/completions"):
    headers = {"content-type": "application/json", **(headers or {})}
    if body is not None:
        content = json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30)
    statuses.append(r.status_code)
    return r


def assert_error(
    r: httpx.Response, status: int, names: str | None = None, param: str | None = None
) -> dict:
    """An OpenAI error body with `status`; its message mentions `names` (the field)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "Traceback" not in error["message"]
    if names is not None:
        assert names.lower() in error["message"].lower(), error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# -- malformed bodies -----------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"{bad", b'{"prompt": "a",}', b"", b"\x00\x01"])
def test_invalid_json(server, content):
    r = post(server, content=content)
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code)


def test_invalid_json_message(server):
    assert_error(post(server, content=b"{bad"), 400, "JSON")


@pytest.mark.parametrize("content", [b"[1]", b'"x"', b"42", b"null", b"true"])
def test_body_not_an_object(server, content):
    error = assert_error(post(server, content=content), 400)
    assert "object" in error["message"] or "prompt" in error["message"]


def test_invalid_utf8_is_a_client_error(server):
    r = post(server, content=b'{"prompt": "\xff\xfe\xfa", "max_tokens": 2}')
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code)


# -- field values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a", "max_tokens": "ten"}, "max_tokens"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [1, 2.5]}, "prompt"),
        ({"prompt": [-1, 2]}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [True]}, "prompt"),
        ({"prompt": "a", "echo": True, "max_tokens": 0}, "max_tokens"),  # 0 only with logprobs
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 65}, "max_tokens"),  # over max_tokens_limit
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "n": 5}, "n"),  # over max_n
        ({"prompt": ["a", "b", "c"], "n": 2}, "n"),  # prompts x n over max_n
        ({"prompt": "a", "temperature": -0.1}, "temperature"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
        ({"prompt": "a", "top_p": 0}, "top_p"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "top_k": -1}, "top_k"),
        ({"prompt": "a", "min_p": -0.1}, "min_p"),
        ({"prompt": "a", "min_p": 1.5}, "min_p"),
        ({"prompt": "a", "min_p": "some"}, "min_p"),
        ({"prompt": "a", "logprobs": 6}, "logprobs"),
        ({"prompt": "a", "logprobs": -1}, "logprobs"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),  # over max_stop
        ({"prompt": "a", "stop": "x" * 17}, "stop"),  # over max_stop_chars
        ({"prompt": "a", "stop": ""}, "stop"),
        ({"prompt": "a", "stop": 3}, "stop"),
        ({"prompt": "a", "seed": "abc"}, "seed"),
        ({"prompt": "a", "seed": 1.5}, "seed"),
        ({"prompt": "a", "stream": "maybe"}, "stream"),
        ({"prompt": "a", "stream": "yes"}, "stream"),
        ({"prompt": "a", "stream": 1}, "stream"),
        ({"prompt": "a", "echo": "true"}, "echo"),
        ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 5.0}, "max_tokens"),
        ({"prompt": "a", "n": "2"}, "n"),
        ({"prompt": "a", "temperature": "0.5"}, "temperature"),
        ({"prompt": "a", "logprobs": True}, "logprobs"),
        ({"prompt": "a", "best_of": 2}, "best_of"),
        ({"prompt": "a", "suffix": "end"}, "suffix"),
        ({"prompt": "a", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "a", "frequency_penalty": "x"}, "frequency_penalty"),
        ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"1": 101}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"100000": 1}}, "logit_bias"),
        ({"prompt": "a", "echo": [1]}, "echo"),
        ({"prompt": "a", "stream_options": 1}, "stream_options"),
        ({"prompt": "a", "stream_options": {"include_usage": "often"}}, "stream_options"),
        ({"prompt": "a", "model": 7}, "model"),
    ],
)
def test_bad_field(server, body, field):
    assert_error(post(server, body), 400, field, param=field)


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_floats(server, field, value):
    content = f'{{"prompt": "a", "max_tokens": 2, "{field}": {value}}}'.encode()
    assert_error(post(server, content=content), 400, field, param=field)


def test_unknown_model(server):
    assert_error(post(server, {**OK, "model": "nope"}), 404, "nope", param="model")


def test_prompt_too_long(server):
    assert_error(post(server, {**OK, "prompt": "a" * 501}), 413, "prompt", param="prompt")
    assert_error(post(server, {**OK, "prompt": ["a", "b" * 501]}), 413, "prompt")


def test_prompt_at_the_limit(server):
    assert post(server, {**OK, "prompt": "a" * 500}).status_code == 200


def test_body_too_large(server):
    error = assert_error(post(server, {**OK, "prompt": "a" * 5000}), 413, "body")
    assert error["code"] == "request_too_large"


def test_body_too_large_chunked(server):
    def chunks():  # no content-length: transfer-encoding chunked
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 500
        yield b'", "max_tokens": 2}'

    r = post(server, content=chunks())
    assert "content-length" not in r.request.headers
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_error(r, 413, "body")


def test_small_chunked_body_is_fine(server):
    def chunks():
        yield b'{"prompt": "The'
        yield b' king", "max_tokens": 2}'

    r = post(server, content=chunks())
    assert r.status_code == 200, r.text


# -- few-shot errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a", "examples": []}, "examples"),
        ({"prompt": "a", "examples": [{"input": "x => y", "output": "z"}]}, "examples"),
        ({"prompt": "a", "examples": [{"input": "x", "output": "y\nz"}]}, "examples"),
        ({"prompt": "a", "examples": [{"input": "", "output": "z"}]}, "examples"),
        ({"prompt": "a", "examples": [{"input": "x"}]}, "examples"),
        ({"prompt": "a", "examples": "x => y"}, "examples"),
        ({"prompt": "a", "examples": ["x => y"]}, "examples"),
        ({"prompt": "a => b", "examples": [{"input": "x", "output": "y"}]}, "prompt"),
        ({"prompt": "a", "template": "{input} {output}"}, "examples"),  # a template, no examples
        (
            {"prompt": "a", "examples": [{"input": "x", "output": "y"}], "template": "{input}"},
            "template",
        ),
        (
            {
                "prompt": "a",
                "examples": [{"input": "x", "output": "y"}],
                "template": "{output} -> {input}",
            },
            "template",
        ),
    ],
)
def test_few_shot_errors(server, body, field):
    assert_error(post(server, body), 400, field, param=field)


def test_few_shot_custom_template(server):
    body = {
        "prompt": "sun",
        "max_tokens": 4,
        "temperature": 0,
        "echo": True,
        "examples": [{"input": "cat", "output": "tac"}],
        "template": "Q: {input} A: {output};",
    }
    r = post(server, body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith("Q: cat A: tac;Q: sun A: ")


# -- accepted oddities ----------------------------------------------------------------------


def test_unseen_characters_are_served(server):
    r = post(server, {"prompt": "日本語🙂", "max_tokens": 4, "logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 4
    assert len(body["choices"][0]["logprobs"]["token_logprobs"]) == 4


def test_unknown_fields_ignored(server):
    body = {
        **OK,
        "user": "me",
        "metadata": {"team": "x"},
        "presence_penalty": 0.5,
        "frequency_penalty": 0.1,
        "logit_bias": {"5": -100},
        "best_of": 1,
        "suffix": None,
        "whatever": [1, {}],
    }
    r = post(server, body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    "extra",
    [
        {"top_k": 2**70},
        {"top_k": 2**63},
        {"seed": 2**70},
        {"seed": -(2**70)},
        {"seed": -1},
        {"model": None, "stop": None, "stream_options": None, "logprobs": None},
        {
            "temperature": None,
            "n": None,
            "stream": None,
            "echo": None,
            "top_p": None,
            "seed": None,
            "presence_penalty": None,
            "stream_options": {"include_usage": None},
        },
        {"temperature": 100, "top_p": 1e-9},
        {"logprobs": 5, "n": 2, "echo": True},
    ],
)
def test_extreme_but_valid_values(server, extra):
    r = post(server, {**OK, **extra})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3 * (extra.get("n") or 1)


def test_null_max_tokens_is_the_default(server):
    r = post(server, {"prompt": "The king", "max_tokens": None, "temperature": None})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16


def test_huge_seed_is_reproducible(server):
    body = {**OK, "max_tokens": 8, "seed": 2**70 + 5}
    assert (
        post(server, body).json()["choices"][0]["text"]
        == post(server, body).json()["choices"][0]["text"]
    )


# -- routes and methods ---------------------------------------------------------------------


def test_unknown_path_and_method(server):
    r = httpx.get(f"{server.url}/v1/nothing", timeout=10)
    statuses.append(r.status_code)
    assert_error(r, 404)
    r = httpx.get(f"{server.url}/v1/completions", timeout=10)
    statuses.append(r.status_code)
    assert_error(r, 405)


# -- API key ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": "s3cret"},
        {"authorization": "Basic s3cret"},
        {"authorization": "Bearer"},
        {"authorization": "Bearer s3cret-and-more"},
    ],
)
def test_api_key_required(keyed_server, headers):
    error = assert_error(post(keyed_server, OK, headers=headers), 401, "key")
    assert error["code"] == "invalid_api_key"
    r = httpx.get(f"{keyed_server.url}/v1/models", headers=headers, timeout=10)
    statuses.append(r.status_code)
    assert_error(r, 401)


def test_api_key_accepted(keyed_server):
    auth = {"authorization": "Bearer s3cret"}
    assert post(keyed_server, OK, headers=auth).status_code == 200
    assert post(keyed_server, OK, headers={"Authorization": "bearer s3cret"}).status_code == 200
    r = httpx.get(f"{keyed_server.url}/v1/models", headers=auth, timeout=10)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"


def test_api_key_with_openai_client(keyed_server):
    import openai

    good = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="s3cret", max_retries=0)
    assert good.completions.create(model="tiny", prompt="We", max_tokens=2).choices
    bad = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="We", max_tokens=2)


def test_every_router_but_health_and_metrics_needs_the_key(keyed_server):
    """The key is checked by each router, before the body or the model is looked at."""
    open_paths = {"/health", "/metrics"}
    paths = {
        path: methods
        for path, methods in keyed_server.app.openapi()["paths"].items()
        if path not in open_paths
    }
    assert {"/v1/models", "/v1/completions", "/v1/embeddings"} <= set(paths)
    for path, methods in paths.items():
        for method in methods:
            for body in ({"prompt": "We", "input": "We"}, {"model": "nope", "prompt": 3}):
                r = httpx.request(
                    method.upper(), f"{keyed_server.url}{path}", json=body, timeout=10
                )
                error = assert_error(r, 401, "key")
                assert error["code"] == "invalid_api_key" and error["param"] is None


def test_health_and_metrics_open_without_key(keyed_server):
    assert httpx.get(f"{keyed_server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{keyed_server.url}/metrics", timeout=10).status_code == 200


# -- afterwards -----------------------------------------------------------------------------


def test_no_server_errors_and_still_serving(server):
    assert statuses and all(status < 500 for status in statuses), sorted(set(statuses))
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    r = post(server, {**OK, "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert server.thread.is_alive()
    assert server.app.state.models["tiny"].engine._thread.is_alive()
