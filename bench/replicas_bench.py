"""Served tokens/s through nginx (deploy/nginx.conf) with 1 and 2 `lm serve` replicas.

The reference GPT of bench/serve_bench.py (4x128 char, block 256, untrained weights) on
every replica; 64 aiohttp clients, each sending requests one after another for 256 new
tokens, without and with streaming. Rows: one replica reached directly (the baseline),
one behind nginx, two behind nginx. The model threads are split between the replicas
(cores / replicas each, or --threads). Needs nginx (`apt-get install nginx`); run from
the repository root.

    python -m bench.replicas_bench [--clients 64] [--requests-per-client 4] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import save_reference_gpt, save_result
from bench.serve_bench import free_port, run_level, start_server
from tests.loopback_nginx import loopback_config, nginx_binary, nginx_command

MODEL = "reference-gpt"


def generated_tokens(port: int) -> float:
    """A replica's own count of generated tokens, from its /metrics."""
    total = 0.0
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        name = line.split("{")[0]
        if name in ("vllm:generation_tokens_total", "lm_generation_tokens_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start_nginx(prefix: Path, upstream_ports: list[int]) -> tuple[subprocess.Popen, int]:
    binary = nginx_binary()
    if binary is None:
        raise SystemExit("nginx is not installed (apt-get install nginx)")
    port = free_port()
    config = loopback_config(prefix, port, upstream_ports)
    proc = subprocess.Popen(nginx_command(binary, prefix, config), stdout=subprocess.DEVNULL)
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("nginx did not start")


def measure(setup: str, replicas: int, via_nginx: bool, checkpoint: str, args) -> list[dict]:
    """One setup: start its replicas (and nginx), run the levels, stop everything."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // replicas)
    ports = [free_port() for _ in range(replicas)]
    servers = [start_server(checkpoint, port, ["--torch-threads", str(threads)]) for port in ports]
    nginx = None
    rows = []
    try:
        with tempfile.TemporaryDirectory() as prefix:
            if via_nginx:
                nginx, port = start_nginx(Path(prefix), ports)
            else:
                port = ports[0]
            for stream in (False, True):  # warm-up: first requests pay one-time costs
                asyncio.run(run_level(port, MODEL, 8 * replicas, 1, stream, 32))
            for stream in (False, True):
                before = [generated_tokens(p) for p in ports]
                row = asyncio.run(
                    run_level(
                        port, MODEL, args.clients, args.requests_per_client, stream, args.tokens
                    )
                )
                after = [generated_tokens(p) for p in ports]
                row.update(
                    setup=setup,
                    replicas=replicas,
                    via_nginx=via_nginx,
                    torch_threads=threads,
                    tokens_per_replica=[round(a - b) for a, b in zip(after, before)],
                )
                rows.append(row)
                print(
                    {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()},
                    flush=True,
                )
            if nginx is not None:
                nginx.terminate()
                nginx.wait(timeout=15)
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=60)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="model threads per replica (default: cores / replicas); 1 when "
        "other work shares the cores, as OpenMP threads then stall",
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / MODEL
        save_reference_gpt(directory)
        for setup, replicas, via_nginx in (
            ("1 replica, direct", 1, False),
            ("1 replica, nginx", 1, True),
            ("2 replicas, nginx", 2, True),
        ):
            rows += measure(setup, replicas, via_nginx, str(directory), args)
    print(
        "\n| setup | stream | requests | failed | tokens/s | tokens per replica | "
        "TTFT p50 / p99 ms | ITL p50 / p99 ms |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        latency = (
            (
                f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f}"
            )
            if r["stream"]
            else "- | -"
        )
        print(
            f"| {r['setup']} | {'yes' if r['stream'] else 'no'} | {r['requests']} | "
            f"{r['failed']} | {r['tokens_per_s']:,.0f} | "
            f"{' + '.join(f'{t:,}' for t in r['tokens_per_replica'])} | {latency} |"
        )
    save_result(
        "replicas",
        {
            "command": "python -m bench.replicas_bench "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
            "rows": rows,
            "cpu_count": os.cpu_count(),
        },
    )


if __name__ == "__main__":
    main()
