"""A real `lm serve` in a subprocess, for the tests that need the whole process (a browser,
lm-evaluation-harness, raw sockets, signals): one launcher instead of one per test module."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

LM_SERVE = ("-m", "lm", "serve")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    process: subprocess.Popen
    url: str


@contextlib.contextmanager
def lm_serve(
    checkpoint: str | Path,
    *flags: str,
    env: dict[str, str] | None = None,
    launcher: tuple[str, ...] | list[str] = LM_SERVE,
    log_level: str = "warning",
    timeout: float = 60.0,
) -> Iterator[Served]:
    """Serve `checkpoint` with one model thread on a free loopback port; yields once /health
    answers. `env` adds to (or, with a None value, removes from) the environment; LM_API_KEY
    is removed unless given. Stopped with SIGTERM (then SIGKILL) at the end."""
    port = free_port()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    environment.pop("LM_API_KEY", None)
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    process = subprocess.Popen(
        [sys.executable, *launcher, "--checkpoint", str(checkpoint), "--port", str(port),
         "--torch-threads", "1", "--log-level", log_level, *flags],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "lm serve did not start"
            time.sleep(0.1)
        yield Served(process, url)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
