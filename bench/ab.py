"""Two source trees side by side: the engine (as `lm serve` runs it) and the server, interleaved.

Refactors must not cost speed, and this machine is too noisy for numbers taken minutes
apart: this runs the same measurement on tree A and tree B alternately, `--rounds` times
each, and reports medians and the B/A ratio. A tree is a checkout (e.g. `git worktree add
--detach ../base REV`); each run is a fresh process with that tree first on PYTHONPATH.

    python -m bench.ab --a ../base --b . [--rounds 3] [--serve]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import save_result

# The configuration `lm serve` uses: an engine thread with every core, main thread kept to 1.
ENGINE_CONFIG = {
    "name": "engine thread, 2 threads, main thread kept to 1 (lm serve)",
    "threads": 2,
    "where": "thread",
    "serving_threads": True,
}


def engine_rate(tree: Path, streams: int, new_tokens: int) -> float:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.engine_bench",
            "--streams",
            str(streams),
            "--new-tokens",
            str(new_tokens),
            "--config",
            json.dumps(ENGINE_CONFIG),
        ],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def serve_rates(tree: Path, clients: int, tokens: int) -> dict[str, float]:
    """Generated tokens/s at `clients` concurrent clients, without and with streaming."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import asyncio, json, sys\n"
            "from bench.serve_bench import free_port, run_level, start_server\n"
            "port = free_port(); server = start_server('shakespeare-char-gpt', port, [])\n"
            "try:\n"
            "    asyncio.run(run_level(port, 'shakespeare-char-gpt', 2, 1, False, 16))\n"
            f"    rows = [asyncio.run(run_level(port, 'shakespeare-char-gpt', {clients}, 4, s, "
            f"{tokens})) for s in (False, True)]\n"
            "finally:\n"
            "    server.terminate(); server.wait(timeout=60)\n"
            "print(json.dumps([r['tokens_per_s'] for r in rows]))\n",
        ],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    )
    plain, streaming = json.loads(out.stdout.strip().splitlines()[-1])
    return {"plain": plain, "streaming": streaming}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="the base tree")
    parser.add_argument("--b", default=".", help="the tree under test")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--serve", action="store_true", help="also lm serve at 64 clients")
    args = parser.parse_args()
    trees = {"a": Path(args.a).resolve(), "b": Path(args.b).resolve()}
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in trees}
    for round_ in range(args.rounds):
        for key, tree in trees.items():
            rates = {"engine": engine_rate(tree, args.streams, args.new_tokens)}
            if args.serve:
                rates.update({f"serve_{k}": v for k, v in serve_rates(tree, 64, 256).items()})
            for name, value in rates.items():
                samples[key].setdefault(name, []).append(value)
            print(
                f"round {round_ + 1} {key}: "
                + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items()),
                flush=True,
            )
    rows = []
    for name in samples["a"]:
        a, b = statistics.median(samples["a"][name]), statistics.median(samples["b"][name])
        rows.append({"measure": name, "a_tokens_per_s": a, "b_tokens_per_s": b, "ratio": b / a})
        print(f"{name}: A {a:,.0f}  B {b:,.0f}  B/A {b / a:.2f}")
    save_result(
        "ab",
        {
            "command": "python -m bench.ab "
            + " ".join(
                f"--{k.replace('_', '-')} {v}"
                for k, v in vars(args).items()
                if v not in (False, None)
            ),
            "trees": {k: str(v) for k, v in trees.items()},
            "samples": samples,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
