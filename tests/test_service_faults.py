"""Faults the server must never pass silently: a request whose logits turn NaN (500 or an
SSE error event, its neighbours in the batch unharmed, counted in /metrics), an engine
failure, and clients that stall in the middle of their request body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from subprocess_server import lm_serve

from lm.checkpoint import load_checkpoint
from service.app import create_app
from service.settings import Settings

POISONED_POSITION = 60
HEALTHY = "The king speaks of"  # 18 characters + 40 tokens: never reaches position 60
POISONED = "The king speaks of the quiet sea, and my good lord defends it."  # 62


@pytest.fixture(scope="module")
def poisoned_server(tiny_checkpoint_dir, launch):
    """ "tiny" with its position embedding 60 set to NaN: every sequence that reaches 60
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
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def events(body: str) -> list[dict | str]:
    data = [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def test_nonfinite_logits_fail_that_request_only_and_are_counted(poisoned_server):
    url = poisoned_server.url
    series = 'lm:nonfinite_logits_total{model_name="tiny"}'
    before = scrape(url).get(series, 0.0)

    async def send_together():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            def post(prompt: str, **extra):
                return client.post(
                    "/v1/completions",
                    json={"model": "tiny", "prompt": prompt, "max_tokens": 40, "seed": 1, **extra},
                )

            return await asyncio.gather(
                post(HEALTHY),
                post(POISONED),
                post(HEALTHY, n=2),
                post(POISONED, stream=True),
                post(HEALTHY, stream=True),
            )

    healthy, bad, healthy_n, bad_stream, healthy_stream = asyncio.run(send_together())

    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "nonfinite_logits"
    assert "not finite (NaN or infinite logits) at generated token 1" in error["message"]

    assert bad_stream.status_code == 200  # the stream had begun: the error is an event
    sent = events(bad_stream.text)
    [failure] = [e for e in sent if isinstance(e, dict) and "error" in e]
    assert failure["error"]["code"] == "nonfinite_logits"
    assert not [
        e
        for e in sent
        if isinstance(e, dict)
        and e.get("choices")
        and e["choices"][0]["finish_reason"] in ("stop", "length")
    ]

    for response in (healthy, healthy_n):
        assert response.status_code == 200, response.text
        body = response.json()
        assert [c["finish_reason"] for c in body["choices"]] == ["length"] * len(body["choices"])
        assert body["usage"]["completion_tokens"] == 40 * len(body["choices"])
    streamed = events(healthy_stream.text)
    assert streamed[-1] == "[DONE]"
    assert (
        "".join(e["choices"][0]["text"] for e in streamed[:-1])
        == healthy.json()["choices"][0]["text"]
    )

    after = scrape(url)
    assert after[series] - before == 2
    assert after['vllm:num_requests_running{model_name="tiny"}'] == 0
    health = httpx.get(f"{url}/health", timeout=10)
    assert health.status_code == 200  # one request's numbers are not the server's health


def test_an_engine_failure_is_a_500_or_an_error_event_never_a_normal_finish(
    tiny_checkpoint_dir, launch
):
    checkpoint = load_checkpoint(tiny_checkpoint_dir)

    def broken_step(*args):
        raise RuntimeError("a bug in a model step")

    checkpoint.model.step = broken_step
    server = launch(create_app(Settings(checkpoints=[str(tiny_checkpoint_dir)]), [checkpoint]))
    request = {"model": "tiny", "prompt": HEALTHY, "max_tokens": 5}
    response = httpx.post(f"{server.url}/v1/completions", json=request, timeout=30)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "engine_error"
    streamed = httpx.post(
        f"{server.url}/v1/completions", json={**request, "stream": True}, timeout=30
    )
    sent = events(streamed.text)
    assert [e["error"]["code"] for e in sent if isinstance(e, dict) and "error" in e] == [
        "engine_error"
    ]
    assert not [
        e
        for e in sent
        if isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"] is not None
    ]


# -- clients that stall mid-body, and the bound on connections -------------------------------


@contextlib.contextmanager
def serving(checkpoint_dir: Path, *flags: str) -> Iterator[str]:
    """A real `lm serve` subprocess (tests/subprocess_server.py); yields its URL."""
    with lm_serve(checkpoint_dir, *flags, log_level="error") as server:
        yield server.url


BODY = b'{"model": "tiny", "prompt": "The king speaks of", "max_tokens": 5, "seed": 1}'


def stall(url: str, count: int) -> list[socket.socket]:
    """`count` connections that send their headers (with Content-Length) and half the body,
    then nothing more."""
    port = int(url.rsplit(":", 1)[1])
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode()
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(head + BODY[: len(BODY) // 2])
        sockets.append(sock)
    return sockets


def stall_headers(url: str, count: int) -> list[socket.socket]:
    """`count` connections that send half their request headers, then nothing more."""
    port = int(url.rsplit(":", 1)[1])
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        sockets.append(sock)
    return sockets


def normal_requests(url: str, count: int = 5) -> list[tuple[int, float]]:
    """(status, seconds) of `count` ordinary completions, one after another."""
    results = []
    with httpx.Client(timeout=30) as client:
        for _ in range(count):
            start = time.monotonic()
            response = client.post(
                f"{url}/v1/completions", content=BODY, headers={"Content-Type": "application/json"}
            )
            results.append((response.status_code, time.monotonic() - start))
    return results


def read_until_closed(sockets: list[socket.socket], deadline: float) -> dict:
    """What each socket receives until the server closes it (or the deadline passes)."""
    received = {sock: b"" for sock in sockets}
    closed_at: dict[socket.socket, float] = {}
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while len(closed_at) < len(sockets) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    received[key.fileobj] += data
                else:
                    closed_at[key.fileobj] = time.monotonic()
                    selector.unregister(key.fileobj)
    return {"received": received, "closed_at": closed_at}


STALLED = 300
BODY_TIMEOUT = 4.0
STALLED_HEADERS = 50
HEADER_TIMEOUT = 2.0


def test_stalled_bodies_are_cut_and_normal_requests_still_answered(tiny_checkpoint_dir):
    with serving(
        tiny_checkpoint_dir,
        "--body-timeout",
        str(BODY_TIMEOUT),
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--limit-concurrency",
        "400",
    ) as url:
        assert normal_requests(url, 1)[0][0] == 200  # warm: first-request costs not counted
        started = time.monotonic()
        sockets = stall(url, STALLED)
        slow_headers = stall_headers(url, STALLED_HEADERS)
        try:
            results = normal_requests(url)
            assert [status for status, _ in results] == [200] * len(results)
            assert max(seconds for _, seconds in results) < 2.0  # promptly, beside 300 stalled
            if time.monotonic() - started < BODY_TIMEOUT - 0.5:  # still within their time:
                with selectors.DefaultSelector() as selector:  # nothing sent to them yet
                    for sock in sockets:
                        selector.register(sock, selectors.EVENT_READ)
                    assert selector.select(timeout=0) == []

            headers_seen = read_until_closed(slow_headers, started + HEADER_TIMEOUT + 20)
            assert len(headers_seen["closed_at"]) == STALLED_HEADERS  # closed without a word
            assert set(headers_seen["received"].values()) == {b""}
            assert min(headers_seen["closed_at"].values()) - started >= HEADER_TIMEOUT - 0.5

            seen = read_until_closed(sockets, started + BODY_TIMEOUT + 20)
            assert len(seen["closed_at"]) == STALLED  # every stalled connection was closed
            for data in seen["received"].values():
                assert data.startswith(b"HTTP/1.1 408 "), data[:200]
                assert b'"code":"request_timeout"' in data
                assert b"did not arrive within 4 seconds" in data
            first, last = min(seen["closed_at"].values()), max(seen["closed_at"].values())
            assert first - started >= BODY_TIMEOUT - 0.5  # not before their time
            assert last - started < BODY_TIMEOUT + 15
            assert normal_requests(url, 1)[0][0] == 200
        finally:
            for sock in sockets + slow_headers:
                sock.close()


def test_connections_beyond_the_limit_get_503_at_once(tiny_checkpoint_dir):
    with serving(tiny_checkpoint_dir, "--limit-concurrency", "40", "--body-timeout", "60") as url:
        sockets = stall(url, 40)
        try:
            [(status, seconds)] = normal_requests(url, 1)
            assert status == 503 and seconds < 2.0  # refused at once, not queued behind them
        finally:
            for sock in sockets:
                sock.close()
        deadline = time.monotonic() + 10
        while (status := normal_requests(url, 1)[0][0]) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == 200  # the stalled clients gone, the server answers again
