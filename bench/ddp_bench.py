"""Training tokens/s with `torchrun` on 1 and 2 processes of this machine (gloo on CPU).

Each run is `torchrun --standalone --nproc-per-node N -m lm train` on the reference corpus
with a 4-layer x 128 char GPT, the same batch per process (so 2 processes step through twice
the tokens), PROCESSESxTHREADS runs (default: the machine's cores in one process, then
shared out over two), and the tokens/s the trainer logs (every process's tokens, after the
first 10 steps, which hold start-up costs).

    python -m bench.ddp_bench [--steps 40] [--runs 1x2,2x1,1x1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import corpus_path, save_result

SHAPE = [
    "--model",
    "gpt",
    "--tokenizer",
    "char",
    "--n-layer",
    "4",
    "--n-embd",
    "128",
    "--n-head",
    "4",
    "--block-size",
    "64",
    "--batch-size",
    "12",
]


def run(processes: int, threads: int, steps: int, tmp: Path) -> dict:
    out = tmp / f"run-{processes}x{threads}"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "-m",
        "lm",
        "train",
        "--corpus",
        str(corpus_path()),
        "--out",
        str(out),
        *SHAPE,
        "--max-steps",
        str(steps),
        "--eval-interval",
        str(steps),
        "--eval-tokens",
        "4096",
        "--threads",
        str(threads),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LM_CACHE_DIR": str(tmp / "cache")}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    train = [r["train_loss"] for r in records if "train_loss" in r]
    return {
        "processes": processes,
        "threads_each": threads,
        "global_batch": 12 * processes,
        "steps": steps,
        "tokens_per_s": round(sum(rates) / len(rates)),
        "train_loss": round(train[-1], 4),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    cores = os.cpu_count() or 1
    parser.add_argument(
        "--runs",
        default=f"1x{cores},2x{max(1, cores // 2)}",
        help="comma-separated PROCESSESxTHREADS",
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs.split(","):
            processes, threads = map(int, spec.split("x"))
            rows.append(run(processes, threads, args.steps, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": f"python -m bench.ddp_bench --steps {args.steps} --runs {args.runs}",
        "steps": args.steps,
        "cores": cores,
        "rows": rows,
    }
    print(f"written {save_result('ddp', result)}")


if __name__ == "__main__":
    main()
