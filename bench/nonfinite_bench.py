"""What the engine's non-finite logits check costs a decode step.

Runs the same batched generation (a shipped checkpoint, `--streams` sequences of
`--new-tokens` tokens, fixed seeds) with the check as shipped and with it replaced by a
no-op, alternating `--rounds` times, and prints the median time per decode step of each,
and the time of the check alone on logits of that shape.

    python -m bench.nonfinite_bench [--checkpoint shakespeare-char-gpt] [--streams 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lm.engine as engine_module
from lm.checkpoint import load_checkpoint
from lm.engine import Engine
from lm.sampling import SamplingParams


def step_ms(checkpoint, streams: int, new_tokens: int) -> float:
    engine = Engine(checkpoint.model, checkpoint.tokenizer, max_batch=streams, max_queue=streams)
    ids = checkpoint.tokenizer.encode("ROMEO:\n")
    for i in range(streams):
        engine.submit(ids, SamplingParams(max_new_tokens=new_tokens, seed=i))
    engine.step()  # admission and prefill, not timed
    start, steps = time.perf_counter(), engine.steps
    engine.run_until_idle()
    return (time.perf_counter() - start) * 1000 / max(1, engine.steps - steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="shakespeare-char-gpt")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    checked = engine_module._nonfinite_rows
    times: dict[str, list[float]] = {"with the check": [], "without": []}
    for _ in range(args.rounds):
        for label in times:
            engine_module._nonfinite_rows = (
                checked if label == "with the check" else (lambda logits: set())
            )
            times[label].append(step_ms(checkpoint, args.streams, args.new_tokens))
    engine_module._nonfinite_rows = checked
    logits = torch.randn(args.streams, checkpoint.config.vocab_size)
    repeats = 1000
    start = time.perf_counter()
    for _ in range(repeats):
        checked(logits)
    alone_us = (time.perf_counter() - start) * 1e6 / repeats
    print(
        f"the check alone: {alone_us:.1f} us on logits[{args.streams}, "
        f"{checkpoint.config.vocab_size}]"
    )
    for label, values in times.items():
        print(
            f"{label}: {statistics.median(values):.3f} ms per decode step "
            f"({args.streams} sequences, {args.checkpoint}, median of {args.rounds})"
        )


if __name__ == "__main__":
    main()
