"""Streaming through HTTP on the default model: `lm serve` variants side by side.

At 64 streaming clients every token costs the server's event loop an event, a JSON chunk
and a write, and on a 2-core machine the loop shares the cores with the engine.
`--stream-flush-ms` lets tokens made within that many milliseconds go out together (first
tokens at once); `--stream-chunk-rate` paces them by the number of streams. This starts
one `lm serve` per variant (by default one per flush interval; `--variant "ARGS"` names a
server's extra arguments instead, after any NAME=VALUE environment variables,
repeatable), all up together, and drives them in turn (waves interleaved, `--rounds`
times) with aiohttp clients as bench/serve_bench.py does: 64 clients streaming, 64 not,
and one client streaming; each request generates `--tokens` tokens inside the default
model's context. Reports medians of tokens/s, time to first token and the gaps between
chunks at the client.

    python -m bench.stream_bench [--flush-ms 0,10,25] [--rounds 3]
    python -m bench.stream_bench --variant "--stream-chunk-rate 0" --variant ""
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics

from bench.common import save_result
from bench.serve_bench import free_port, rss_mb, run_level, split_variant, start_server

CHECKPOINT = "shakespeare-char-gpt"
# (clients, requests per client, streaming): the levels of one wave.
LEVELS = ((64, 2, True), (64, 2, False), (1, 4, True))
MEASURES = ("tokens_per_s", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms", "mean_tokens_per_chunk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flush-ms", default="0,10,25", help="intervals to compare")
    parser.add_argument(
        "--variant",
        action="append",
        help="a server's extra `lm serve` arguments, after any NAME=VALUE environment "
        "variables (repeatable; replaces --flush-ms)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per request")
    args = parser.parse_args()
    variants = args.variant or [f"--stream-flush-ms {float(x):g}" for x in args.flush_ms.split(",")]
    servers = {}
    try:
        for variant in variants:
            port = free_port()
            env, extra = split_variant(variant)
            servers[variant] = (port, start_server(CHECKPOINT, port, extra, env))
        for port, _ in servers.values():  # warm-up
            asyncio.run(run_level(port, CHECKPOINT, 8, 1, True, 16))
        samples: dict[tuple, list[dict]] = {}
        for round_index in range(args.rounds):
            for clients, per_client, stream in LEVELS:
                for variant, (port, _) in servers.items():
                    row = asyncio.run(
                        run_level(port, CHECKPOINT, clients, per_client, stream, args.tokens)
                    )
                    if row["failed"]:
                        raise SystemExit(f"{row['failed']} requests failed with {variant}")
                    samples.setdefault((variant, clients, stream), []).append(row)
                    print(
                        f"round {round_index + 1}: {variant}, {clients} clients, "
                        f"stream {stream}: {row['tokens_per_s']:,.0f} tokens/s",
                        flush=True,
                    )
        memory = {variant: rss_mb(proc.pid) for variant, (_, proc) in servers.items()}
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    rows = []
    for (variant, clients, stream), rs in samples.items():
        row = {"variant": variant, "clients": clients, "stream": stream, "rounds": len(rs)}
        for name in MEASURES:
            values = [r[name] for r in rs if r.get(name) is not None]
            row[name] = statistics.median(values) if values else None
        row["tokens_per_s_range"] = [
            min(r["tokens_per_s"] for r in rs),
            max(r["tokens_per_s"] for r in rs),
        ]
        rows.append(row)
    save_result(
        "stream",
        {
            "command": "python -m bench.stream_bench "
            + (
                "".join(f"--variant {shlex.quote(v)} " for v in args.variant)
                if args.variant
                else f"--flush-ms {args.flush_ms} "
            )
            + f"--rounds {args.rounds} --tokens {args.tokens}",
            "variants": variants,
            "checkpoint": CHECKPOINT,
            "tokens": args.tokens,
            "rows": rows,
            "rss_mb": memory,
        },
    )


if __name__ == "__main__":
    main()
