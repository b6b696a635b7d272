"""What checkpoint validation adds to load time, for every shipped checkpoint.

Times `load_checkpoint` (which validates) and, in the same process, the checks alone
(`check_weights`: names, shapes, dtypes, `isfinite` over every tensor); the load without
validation is the difference. Median of `--repeats` loads, one thread, after a warm-up.

    python -m bench.load_bench [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from safetensors.torch import load_file

from lm.checkpoint import (
    WEIGHTS_FILE,
    check_weights,
    load_checkpoint,
    resolve,
    shipped_checkpoints,
)


def median_ms(fn, args: tuple, repeats: int) -> float:
    fn(*args)  # warm-up: page cache, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| checkpoint | weights | load with validation | checks alone | without | added |")
    print("|---|---|---|---|---|---|")
    for name in shipped_checkpoints():
        weights = resolve(name) / WEIGHTS_FILE
        model = load_checkpoint(name).model
        state = load_file(weights)
        total = median_ms(load_checkpoint, (name,), args.repeats)
        checks = median_ms(check_weights, (state, model, weights), args.repeats)
        size = weights.stat().st_size / 1e6
        print(
            f"| {name} | {size:.1f} MB | {total:.1f} ms | {checks:.1f} ms | "
            f"{total - checks:.1f} ms | {100 * checks / (total - checks):.0f}% |"
        )


if __name__ == "__main__":
    main()
