"""nginx (deploy/nginx.conf) in front of two real `lm serve` processes on loopback ports."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from loopback_nginx import ROOT, loopback_config, nginx_binary, nginx_command

NGINX = nginx_binary()
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx; .ci/run does it)"
)

CLIENTS = 8
MAX_TOKENS = 96
PROMPT = "The king speaks of "
_GENERATED = re.compile(
    r"^(?:lm_generation_tokens|vllm:generation_tokens)_total\{[^}]*\} (\S+)$", re.MULTILINE
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} gave no healthy answer at {url}/health in {timeout} s")


def generated_tokens(replica_url: str) -> float:
    """The replica's own count of generated tokens (its /metrics), summed over models."""
    text = httpx.get(f"{replica_url}/metrics", timeout=5.0).text
    return sum(float(value) for value in _GENERATED.findall(text))


@dataclass
class Cluster:
    url: str  # nginx
    replica_urls: list[str]
    replicas: list[subprocess.Popen]
    prefix: Path


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint_dir, tmp_path_factory):
    """Two `lm serve` processes (one model thread each) behind nginx on loopback."""
    ports = [_free_port() for _ in range(2)]
    env = {**os.environ, "LM_API_KEY": ""}
    replicas = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lm",
                "serve",
                "--checkpoint",
                str(tiny_checkpoint_dir),
                "--port",
                str(port),
                "--torch-threads",
                "1",
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    prefix = tmp_path_factory.mktemp("nginx")
    listen = _free_port()
    config = loopback_config(prefix, listen, ports)
    nginx = None
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for number, (url, proc) in enumerate(zip(urls, replicas)):
            _wait_healthy(url, proc, f"replica {number}")
        nginx = subprocess.Popen(
            nginx_command(NGINX, prefix, config), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _wait_healthy(f"http://127.0.0.1:{listen}", nginx, "nginx", timeout=15.0)
        yield Cluster(f"http://127.0.0.1:{listen}", urls, replicas, prefix)
    finally:
        for proc in [*replicas, *([nginx] if nginx else [])]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*replicas, *([nginx] if nginx else [])]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _body(stream: bool, seed: int) -> dict:
    return {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 1.0,
        "seed": seed,
        "stream": stream,
    }


def complete(http: httpx.Client, stream: bool, seed: int) -> str:
    """'ok', or how the request failed: '502' and 'truncated' are the clean failures."""
    try:
        if not stream:
            response = http.post("/v1/completions", json=_body(False, seed))
            if response.status_code == 502 and "error" in response.json():
                return "502"
            if response.status_code != 200:
                return f"status {response.status_code}: {response.text[:200]}"
            choice = response.json()["choices"][0]
            tokens = response.json()["usage"]["completion_tokens"]
            ok = choice["finish_reason"] == "length" and tokens == MAX_TOKENS
            return "ok" if ok else f"short answer: {response.text[:200]}"
        with http.stream("POST", "/v1/completions", json=_body(True, seed)) as response:
            if response.status_code != 200:
                body = response.read()
                if response.status_code == 502 and "error" in json.loads(body):
                    return "502"
                return f"status {response.status_code}: {body[:200]!r}"
            events = [
                line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")
            ]
        if not events or events[-1] != "[DONE]":
            return "truncated"  # the client sees the stream end without [DONE]
        chunks = [json.loads(event) for event in events[:-1]]
        if any("error" in chunk for chunk in chunks):
            return f"error event: {events[:3]}"
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
        return "ok" if reasons and reasons[-1] == "length" else f"no finish: {events[-3:]}"
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return "truncated"  # the connection closed mid-body: a chunked stream left unfinished


def test_requests_reach_both_replicas(cluster):
    before = [generated_tokens(url) for url in cluster.replica_urls]
    with httpx.Client(base_url=cluster.url, timeout=30.0) as http:
        for seed in range(6):
            assert complete(http, stream=False, seed=seed) == "ok"
        assert complete(http, stream=True, seed=99) == "ok"
    after = [generated_tokens(url) for url in cluster.replica_urls]
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert sum(after) - sum(before) == 7 * MAX_TOKENS


@dataclass
class Outcome:
    started: float
    ended: float
    stream: bool
    result: str


def test_sigkill_fails_only_the_requests_in_flight_on_that_replica(cluster):
    results: list[Outcome] = []
    stop = threading.Event()

    def client(number: int) -> None:
        with httpx.Client(base_url=cluster.url, timeout=30.0) as http:
            for attempt in range(10_000):  # bounded; the stop event ends it in seconds
                if stop.is_set():
                    return
                stream = (number + attempt) % 2 == 0
                started = time.monotonic()
                result = complete(http, stream, seed=number * 1000 + attempt)
                results.append(Outcome(started, time.monotonic(), stream, result))

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()

    def wait_for(condition, seconds: float) -> None:
        """Until condition() holds (the load runs meanwhile), at most seconds long."""
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)

    # Both replicas busy and some requests already done (slower on a loaded machine).
    wait_for(lambda: len(results) >= CLIENTS, 30.0)
    victim, survivor_url = cluster.replicas[0], cluster.replica_urls[1]
    survivor_before = generated_tokens(survivor_url)
    kill_start = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    kill_done = time.monotonic()
    wait_for(lambda: sum(o.started > kill_done for o in results) >= 2 * CLIENTS, 30.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)

    unclean = [o for o in results if o.result not in ("ok", "502", "truncated")]
    assert not unclean, unclean[:3]
    failed = [o for o in results if o.result != "ok"]
    # Only requests in flight when the replica died fail: at most one per client...
    assert 1 <= len(failed) <= CLIENTS, [o.result for o in failed]
    assert all(o.started < kill_done and o.ended >= kill_start for o in failed), failed
    # ...requests finished before the kill succeeded, and every later one succeeds on the
    # survivor (nginx retries a refused connection; it never re-sends a received request).
    before = [o for o in results if o.ended < kill_start]
    after = [o for o in results if o.started > kill_done]
    assert before and all(o.result == "ok" for o in before)
    assert len(after) >= CLIENTS and all(o.result == "ok" for o in after)
    assert {o.stream for o in after} == {True, False}
    assert generated_tokens(survivor_url) - survivor_before >= len(after) * MAX_TOKENS
    with httpx.Client(base_url=cluster.url, timeout=30.0) as http:
        assert all(
            complete(http, stream, seed) == "ok" for seed, stream in enumerate([False, True] * 3)
        )
