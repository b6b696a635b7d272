"""`lm serve` against `llama-server` on the same GGUF through HTTP (bench/peers.py).

aiohttp clients as vLLM's benchmark_serving: each client sends its requests one after
another; both servers are up together and driven in turn (round robin). Fixed lengths:
lm's models have no end token, llama-server is sent `ignore_eos`; answers of another
length are counted as `short`.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from pathlib import Path

from bench.peers_engines import brief
from bench.peers_formats import Exports
from bench.serve_bench import sse_events

REQUEST_TIMEOUT_S = 300


def start_llama_server(binary: Path, gguf: Path, port: int, slots: int, context: int, threads: int):
    """llama-server on the loopback: `slots` parallel sequences of `context` tokens each."""
    import urllib.request

    proc = subprocess.Popen(
        [
            str(binary),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-np",
            str(slots),
            "-c",
            str(slots * context),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "--no-webui",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(
                    f"llama-server exited: {proc.stderr.read().decode()[-3000:]}"
                ) from None
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("llama-server did not start")


async def http_request(session, url: str, body: dict) -> dict:
    """One completion; generated tokens from `usage` (stream_options.include_usage when
    streaming), time to first text for streams."""
    import aiohttp

    try:
        return await _request(session, url, body)
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:  # counted as failed
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}


async def _request(session, url: str, body: dict) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    async with session.post(url, json=body) as response:
        if response.status != 200:
            return {"ok": False, "status": response.status, "body": await response.text()}
        if not body["stream"]:
            tokens = (await response.json())["usage"]["completion_tokens"]
        else:
            async for data in sse_events(response):
                if first is None and any(c.get("text") for c in data.get("choices", [])):
                    first = time.perf_counter()
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
    return {
        "ok": True,
        "seconds": time.perf_counter() - start,
        "ttft": None if first is None else first - start,
        "tokens": tokens,
    }


async def http_level(
    port: int,
    body: dict,
    prompts: list[str],
    clients: int,
    per_client: int,
) -> dict:
    """`clients` concurrent clients, each sending `per_client` requests one after another
    (client i's j-th request uses prompt i*per_client+j): aggregate tokens/s, mean TTFT."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    # A new connection per request, as vLLM's benchmark (a session per request): reusing a
    # kept-alive connection that llama-server has closed fails the next request's write.
    connector = aiohttp.TCPConnector(limit=clients + 4, force_close=True)
    # A request that hangs fails alone (one level once waited forever on llama-server).
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(index: int) -> list[dict]:
            out = []
            for j in range(per_client):
                prompt = prompts[(index * per_client + j) % len(prompts)]
                out.append(await http_request(session, url, {**body, "prompt": prompt}))
            return out

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*map(client, range(clients))) for r in rs]
        elapsed = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    short = sum(r["tokens"] != body["max_tokens"] for r in ok)
    if len(ok) < len(results):
        print(f"    failed: {next(r for r in results if not r['ok'])}", flush=True)
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "short": short,  # answers of another length than max_tokens: the rates are not comparable
        "tokens": sum(r["tokens"] for r in ok),
        "seconds": elapsed,
        "tokens_per_s": sum(r["tokens"] for r in ok) / elapsed,
        "mean_ttft_ms": statistics.mean(ttft) * 1000 if ttft else None,
        "mean_latency_ms": statistics.mean(r["seconds"] for r in ok) * 1000 if ok else None,
    }


def time_http(
    exports: Exports,
    binaries: dict[str, Path],
    prompts: list[str],
    block_size: int,
    clients: list[int],
    rounds: int,
    per_client: int,
    max_tokens: int,
    threads: int,
    peer_clients: list[int] | None = None,
) -> list[dict]:
    """lm serve and llama-server, both up, driven in turn (round robin) at each level;
    llama-server only at the levels in `peer_clients` (default: all of them)."""
    peer_clients = clients if peer_clients is None else peer_clients
    from bench.serve_bench import free_port, start_server

    body = {"max_tokens": max_tokens, "temperature": 0.0}
    servers = {}
    lm_port, llama_port = free_port(), free_port()
    processes = [start_server(str(exports.checkpoint), lm_port, ["--max-batch", str(max(clients))])]
    try:
        servers = {"lm serve": (lm_port, {"model": exports.checkpoint.name})}
        if peer_clients:
            processes.append(
                start_llama_server(
                    binaries["llama-server"],
                    exports.gguf,
                    llama_port,
                    max(peer_clients),
                    block_size,
                    threads,
                )
            )
            servers["llama-server"] = (llama_port, {"model": "gguf", "ignore_eos": True})
        for port, extra in servers.values():  # warm-up
            asyncio.run(http_level(port, {**body, **extra, "stream": False}, prompts, 2, 1))
        samples = []
        for round_index in range(rounds):
            for stream in (False, True):
                for level in clients:
                    for name, (port, extra) in servers.items():
                        if name == "llama-server" and level not in peer_clients:
                            continue
                        request = {**body, **extra, "stream": stream}
                        if stream:
                            request["stream_options"] = {"include_usage": True}
                        row = asyncio.run(http_level(port, request, prompts, level, per_client))
                        sample = {
                            "server": name,
                            "clients": level,
                            "stream": stream,
                            "round": round_index,
                            **row,
                        }
                        print(f"  round {round_index + 1}/{rounds}: {brief(sample)}", flush=True)
                        samples.append(sample)
        return samples
    finally:
        for proc in processes:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:  # llama-server may not stop on SIGTERM
                proc.kill()
                proc.wait(timeout=20)
