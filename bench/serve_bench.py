"""HTTP serving: aggregate tokens/s and latency at 1, 8, 32 and 64 concurrent clients.

Starts `lm serve` on a loopback port with the reference GPT (4 layers, 4 heads, 128 wide,
character vocabulary, block 256; untrained weights, which cost the same to run) and
drives it with aiohttp clients, each sending requests one after another for 256 new
tokens (no stop sequence, so every request makes all 256). Streaming rows measure time to
first token and inter-token latency at the client; non-streaming rows measure end-to-end
latency. Also records the server's resident memory, with the reference model and with
the shipped default model, and draws a plot.

    python -m bench.serve_bench [--clients 1,8,32,64] [--requests-per-client 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, save_reference_gpt, save_result

PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def split_variant(variant: str) -> tuple[dict[str, str], list[str]]:
    """A variant's leading NAME=VALUE words (the server's environment) and its arguments:
    "OMP_WAIT_POLICY=passive --torch-threads 2"."""
    words = shlex.split(variant)
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, words


def start_server(
    checkpoint: str, port: int, extra: list[str], env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`lm serve` on `port`, with `extra` arguments and `env` added to the environment;
    returns once /health answers."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lm",
            "serve",
            "--checkpoint",
            checkpoint,
            "--port",
            str(port),
            "--log-level",
            "warning",
            *extra,
        ],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    import urllib.request

    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read().decode()}") from None
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[index]


async def sse_events(response):
    """The JSON objects of a streamed completion's server-sent `data:` events, as they come
    (aiohttp response; the closing `[DONE]` left out)."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if event.startswith(b"data: ") and event != b"data: [DONE]":
                yield json.loads(event[6:])


async def one_request(session, url: str, model: str, stream: bool, tokens: int, seed: int):
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 1.0,
        "seed": seed,
        "stream": stream,
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    generated = 0
    async with session.post(url, json=body) as response:
        if response.status != 200:
            return {"ok": False, "status": response.status}
        if not stream:
            data = await response.json()
            generated = data["usage"]["completion_tokens"]
            arrivals.append(time.perf_counter())
        else:
            async for data in sse_events(response):
                choice = data["choices"][0]
                if choice["text"]:
                    arrivals.append(time.perf_counter())
                    generated += len(choice["text"])  # one character per token here
    end = time.perf_counter()
    return {"ok": True, "start": start, "end": end, "arrivals": arrivals, "tokens": generated}


async def run_level(
    port: int, model: str, clients: int, per_client: int, stream: bool, tokens: int
) -> dict:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    connector = aiohttp.TCPConnector(limit=clients + 4)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(index: int):
            return [
                await one_request(session, url, model, stream, tokens, index * 1000 + i)
                for i in range(per_client)
            ]

        start = time.perf_counter()
        results = [
            r for batch in await asyncio.gather(*(client(i) for i in range(clients))) for r in batch
        ]
        elapsed = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    ttft, itl, e2e = [], [], []
    for r in ok:
        e2e.append(r["end"] - r["start"])
        if stream and r["arrivals"]:
            ttft.append(r["arrivals"][0] - r["start"])
            gaps = [b - a for a, b in zip(r["arrivals"], r["arrivals"][1:])]
            # A chunk may carry several tokens when the client falls behind; spread its gap.
            itl.extend(gaps)
    total_tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients,
        "stream": stream,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "tokens": total_tokens,
        "seconds": elapsed,
        "tokens_per_s": total_tokens / elapsed,
        "ttft_p50_ms": percentile(ttft, 50) * 1000 if ttft else None,
        "ttft_p99_ms": percentile(ttft, 99) * 1000 if ttft else None,
        "itl_p50_ms": percentile(itl, 50) * 1000 if itl else None,
        "itl_p99_ms": percentile(itl, 99) * 1000 if itl else None,
        "e2e_p50_ms": percentile(e2e, 50) * 1000,
        "e2e_p99_ms": percentile(e2e, 99) * 1000,
        "mean_tokens_per_chunk": (total_tokens / max(1, sum(len(r["arrivals"]) for r in ok)))
        if stream
        else None,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for stream in (False, True):
        sel = [r for r in rows if r["stream"] == stream]
        label = "streaming" if stream else "non-streaming"
        left.plot([r["clients"] for r in sel], [r["tokens_per_s"] for r in sel], "o-", label=label)
        if stream:
            right.plot(
                [r["clients"] for r in sel], [r["itl_p50_ms"] for r in sel], "o-", label="ITL p50"
            )
            right.plot(
                [r["clients"] for r in sel], [r["itl_p99_ms"] for r in sel], "o-", label="ITL p99"
            )
            right.plot(
                [r["clients"] for r in sel],
                [r["ttft_p50_ms"] for r in sel],
                "s--",
                label="TTFT p50",
            )
    left.set_xlabel("concurrent clients")
    left.set_ylabel("generated tokens/s (all clients)")
    left.set_xscale("log", base=2)
    left.grid(alpha=0.3)
    left.legend()
    right.set_xlabel("concurrent clients")
    right.set_ylabel("ms")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.grid(alpha=0.3)
    right.legend()
    fig.suptitle("lm serve, reference GPT (4x128, char), 256 new tokens per request, 2 cores")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument(
        "--requests-per-client",
        type=int,
        default=4,
        help="requests each client sends one after another (at 64 clients, 4 "
        "make a run of about 3 seconds: shorter runs are noisy here)",
    )
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--server-args", default="", help="extra `lm serve` flags")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    extra = args.server_args.split()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "reference-gpt"
        save_reference_gpt(directory)
        port = free_port()
        server = start_server(str(directory), port, extra)
        try:
            memory = {"reference_start_mb": rss_mb(server.pid)}
            rows = []
            asyncio.run(run_level(port, "reference-gpt", 2, 1, False, 16))  # warm-up
            for stream in (False, True):
                for clients in levels:
                    row = asyncio.run(
                        run_level(
                            port,
                            "reference-gpt",
                            clients,
                            args.requests_per_client,
                            stream,
                            args.tokens,
                        )
                    )
                    rows.append(row)
                    print(
                        {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()},
                        flush=True,
                    )
            memory["reference_end_mb"] = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
    # Memory of the default configuration: `lm serve` with the shipped default model.
    port = free_port()
    server = start_server("shakespeare-char-gpt", port, [])
    try:
        asyncio.run(run_level(port, "shakespeare-char-gpt", 64, 1, True, 256))
        memory["default_model_after_64_streams_mb"] = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(memory)
    plot(rows, ROOT / "docs" / "serve_throughput.png")
    save_result(
        "serve",
        {
            "command": "python -m bench.serve_bench "
            + " ".join(
                f"--{k.replace('_', '-')} {v!r}"
                for k, v in vars(args).items()
                if v not in ("", None)
            ),
            "server_args": extra,
            "levels": levels,
            "rows": rows,
            "memory": memory,
            "cpu_count": os.cpu_count(),
        },
    )


if __name__ == "__main__":
    main()
