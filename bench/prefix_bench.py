"""Prefix caching through HTTP: 64 concurrent few-shot requests that share their 8 examples
against 64 whose examples all differ, with the prefix cache on and off.

Starts `lm serve` with a shipped few-shot checkpoint and sends each wave of `--clients`
streaming completions at once through the API's `examples` field (8 reversal examples of
ordinary English words, then a query; greedy, the answer ends at the template's line end).
"shared": every request has the same 8 examples and its own query, so after the first
request the examples' KV blocks are cached; "distinct": each request draws its own 8
examples, so nothing but the template's first characters is shared. Reports requests/s,
mean and p50 time to first token, the server's prefix-cache hit rate and its memory, as the
mean over `--rounds` waves of each kind, interleaved. First, `--warmup` waves of each kind
that are not counted: a fresh server's first wave pays one-time costs (~250 ms more to the
first token), which would fall on whichever kind goes first.

    python -m bench.prefix_bench [--checkpoint fewshot-char-gpt] [--clients 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import statistics
import time
import urllib.request

from bench.common import save_result
from bench.serve_bench import free_port, rss_mb, split_variant, start_server
from lm.tasks import word_list

SHOTS = 8


def _examples(words: list[str], rng: random.Random) -> list[dict]:
    return [{"input": w, "output": w[::-1]} for w in rng.sample(words, SHOTS)]


async def one(session, url: str, model: str, examples: list[dict], query: str) -> dict:
    body = {
        "model": model,
        "prompt": query,
        "examples": examples,
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    first = None
    text = ""
    async with session.post(url, json=body) as response:
        if response.status != 200:
            return {"ok": False, "status": response.status, "body": await response.text()}
        async for line in response.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0]["text"]
            if piece and first is None:
                first = time.perf_counter()
            text += piece
    end = time.perf_counter()
    return {"ok": True, "ttft": (first or end) - start, "e2e": end - start, "text": text}


async def wave(port: int, model: str, requests: list[tuple[list[dict], str]]) -> dict:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    connector = aiohttp.TCPConnector(limit=len(requests) + 4)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(session, url, model, e, q) for e, q in requests))
        elapsed = time.perf_counter() - start
    bad = [r for r in results if not r["ok"]]
    if bad:
        raise SystemExit(f"{len(bad)} requests failed: {bad[0]}")
    ttft = [r["ttft"] for r in results]
    return {
        "requests_per_s": len(results) / elapsed,
        "ttft_mean_ms": statistics.mean(ttft) * 1000,
        "ttft_p50_ms": statistics.median(ttft) * 1000,
        "correct": sum(r["text"].strip() == q[::-1] for r, (_, q) in zip(results, requests)),
    }


def server_counts(port: int) -> dict[str, float]:
    """The server's prefix-cache queries and hits, and the sum and count of its time to
    first token (seconds), from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))

    return {
        "queries": total("vllm:prefix_cache_queries_total"),
        "hits": total("vllm:prefix_cache_hits_total"),
        "ttft_sum": total("vllm:time_to_first_token_seconds_sum"),
        "ttft_count": total("vllm:time_to_first_token_seconds_count"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="fewshot-char-gpt")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="uncounted rounds first")
    parser.add_argument(
        "--server-args",
        default="",
        help="extra `lm serve` arguments for both servers, after any NAME=VALUE environment "
        "variables",
    )
    args = parser.parse_args()
    env, extra = split_variant(args.server_args)
    words = sorted(w for n, ws in word_list("heldout").items() if 3 <= n <= 8 for w in ws)
    rng = random.Random(0)
    rows = []
    for cache_mb in ("64", "0"):
        port = free_port()
        server = start_server(args.checkpoint, port, [*extra, "--prefix-cache-mb", cache_mb], env)
        try:
            model = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").read())
            model = model["data"][0]["id"]
            results: dict[str, list[dict]] = {"shared": [], "distinct": []}
            for round_ in range(args.warmup + args.rounds):
                for kind in results:  # interleaved: shared, distinct, shared, ...
                    shared = _examples(words, rng)
                    requests = [
                        (shared if kind == "shared" else _examples(words, rng), rng.choice(words))
                        for _ in range(args.clients)
                    ]
                    before = server_counts(port)
                    result = asyncio.run(wave(port, model, requests))
                    after = server_counts(port)
                    delta = {k: after[k] - before[k] for k in after}
                    queried = delta["queries"]
                    result["hit_rate"] = delta["hits"] / queried if queried else 0.0
                    # The engine's own time to first token (from its submit): the rest of
                    # the client's is HTTP, parsing and delivery.
                    result["server_ttft_mean_ms"] = (
                        1000 * delta["ttft_sum"] / delta["ttft_count"]
                        if delta["ttft_count"]
                        else None
                    )
                    if round_ >= args.warmup:
                        results[kind].append(result)
            for kind, waves in results.items():
                row = {
                    "prefix_cache_mb": float(cache_mb),
                    "examples": kind,
                    **{k: statistics.mean(w[k] for w in waves) for k in waves[0]},
                    "rss_mb": rss_mb(server.pid),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    on = {r["examples"]: r for r in rows if r["prefix_cache_mb"]}
    ratios = {
        "requests_per_s": on["shared"]["requests_per_s"] / on["distinct"]["requests_per_s"],
        "ttft_mean": on["distinct"]["ttft_mean_ms"] / on["shared"]["ttft_mean_ms"],
    }
    print(json.dumps({"shared_vs_distinct": ratios}))
    save_result(
        "prefix",
        {
            "command": "python -m bench.prefix_bench "
            f"--checkpoint {args.checkpoint} --clients {args.clients} --rounds {args.rounds} "
            f"--warmup {args.warmup}"
            + (f" --server-args {shlex.quote(args.server_args)}" if args.server_args else ""),
            "server_args": args.server_args,
            "checkpoint": args.checkpoint,
            "clients": args.clients,
            "warmup_rounds": args.warmup,
            "shots": SHOTS,
            "rows": rows,
            "shared_vs_distinct": ratios,
        },
    )


if __name__ == "__main__":
    main()
