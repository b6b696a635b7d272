"""Generation speed of two checkpoints back to back: the classic char GPT (GPT-2 blocks,
context 128) against the modern one that replaced it (Qwen3 blocks, context 256).

Rounds alternate between the two (A, B, A, B, ...), each timing: the engine alone at 1 and
64 streams (generated tokens/s including prefill, 2 threads, a fresh engine each time),
then `lm serve` at 1 and 64 streaming clients through HTTP (aiohttp, the same 64 new
tokens per request). Every request makes exactly its tokens (no stop), inside both models' context.
The result is the median over rounds and the ratio new/old.

    python -m bench.blocks_bench --old runs/shakespeare-char-gpt-classic \\
        --new checkpoints/shakespeare-char-gpt [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import urllib.request

import torch

from bench.common import save_result
from bench.serve_bench import free_port, rss_mb, run_level, start_server

PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"
NEW_TOKENS = 64  # the prompt plus these stay inside a 128-token context


def engine_rate(path: str, streams: int) -> float:
    from lm.checkpoint import load_checkpoint
    from lm.engine import Engine
    from lm.sampling import SamplingParams

    ckpt = load_checkpoint(path)
    ids = ckpt.tokenizer.encode(PROMPT)
    engine = Engine(ckpt.model, ckpt.tokenizer, max_batch=streams, threads=2)
    start = time.perf_counter()
    for i in range(streams):
        params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=i)
        engine.submit(ids[: len(ids) - i % 8], params)
    engine.run_until_idle()
    return streams * NEW_TOKENS / (time.perf_counter() - start)


def serve_rates(path: str) -> dict:
    port = free_port()
    server = start_server(path, port, [])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as response:
            model = json.loads(response.read())["data"][0]["id"]
        asyncio.run(run_level(port, model, 2, 1, True, 16))  # warm-up
        one = asyncio.run(run_level(port, model, 1, 4, True, NEW_TOKENS))
        many = asyncio.run(run_level(port, model, 64, 2, True, NEW_TOKENS))
        return {
            "serve_1_stream": one["tokens_per_s"],
            "serve_64_streams": many["tokens_per_s"],
            "serve_64_ttft_p50_ms": many["ttft_p50_ms"],
            "rss_mb": rss_mb(server.pid),
        }
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the classic checkpoint directory")
    parser.add_argument("--new", required=True, help="the modern checkpoint directory")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for which in ("old", "new"):
            path = getattr(args, which)
            row = {
                "engine_1_stream": engine_rate(path, 1),
                "engine_64_streams": engine_rate(path, 64),
                **serve_rates(path),
            }
            runs[which].append(row)
            print(which, json.dumps({k: round(v) for k, v in row.items()}), flush=True)
    medians = {
        which: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for which, rows in runs.items()
    }
    ratios = {key: medians["new"][key] / medians["old"][key] for key in medians["old"]}
    print(json.dumps({"median": medians, "new_over_old": ratios}, indent=1))
    save_result(
        "blocks",
        {
            "command": f"python -m bench.blocks_bench --old {args.old} --new {args.new} "
            f"--rounds {args.rounds}",
            "new_tokens": NEW_TOKENS,
            "old": args.old,
            "new": args.new,
            "median": medians,
            "new_over_old": ratios,
            "rounds": runs,
        },
    )


if __name__ == "__main__":
    main()
