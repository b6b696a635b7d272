"""The continuous-batching engine alone (no HTTP): where the model's CPU time goes.

64 sequences of the reference GPT (4x128 char, block 256, random weights) each make 256
tokens by sampling from prompts of different lengths, so that rows sit at different
positions as they do in a server. Each configuration runs in a fresh process (OpenMP state
is per process) and is timed on its second run (the first warms caches); the resident
memory is read at the end.

- `main, N threads`: the engine steps in the main thread (as `lm generate` does), with
  the defaults: decode attention in the compiled kernel (lm/native), bfloat16 KV cache.
- `engine thread, 2 threads, main thread used first`: the engine runs in a background
  thread (as in `lm serve`) after the main thread ran one parallel op with 2 threads.
- `engine thread, 2 threads, main thread kept to 1`: the same after `serving_threads`,
  which is what `lm serve` does.
- `float32 / float16 KV cache`: the kernel with the other cache precisions.
- `PyTorch attention`: `LM_NATIVE=0`, the path used where no C compiler is found (as
  before the kernel existed), with its float32 cache.
- `bfloat16 model`: the whole model cast to bfloat16 (PyTorch attention).

    python -m bench.engine_bench [--streams 64] [--new-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.common import reference_gpt, save_result

CONFIGS = [
    {"name": "main thread, 1 thread", "threads": 1, "where": "main"},
    {"name": "main thread, 2 threads", "threads": 2, "where": "main"},
    {
        "name": "engine thread, 2 threads, main thread used first",
        "threads": 2,
        "where": "thread",
        "main_parallel_op": True,
    },
    {
        "name": "engine thread, 2 threads, main thread kept to 1 (lm serve)",
        "threads": 2,
        "where": "thread",
        "serving_threads": True,
    },
    {
        "name": "main thread, 2 threads, float32 KV cache",
        "threads": 2,
        "where": "main",
        "kv_cache_dtype": "float32",
    },
    {
        "name": "main thread, 2 threads, float16 KV cache",
        "threads": 2,
        "where": "main",
        "kv_cache_dtype": "float16",
    },
    {
        "name": "main thread, 2 threads, PyTorch attention (LM_NATIVE=0)",
        "threads": 2,
        "where": "main",
        "native": False,
    },
    {
        "name": "main thread, 2 threads, bfloat16 model",
        "threads": 2,
        "where": "main",
        "model_dtype": "bfloat16",
    },
]


def run_config(config: dict, streams: int, new_tokens: int) -> dict:
    """One configuration, in this process: {"tokens_per_s", "rss_mb"}."""
    import threading
    import time

    import torch

    from lm.device import serving_threads
    from lm.engine import Engine
    from lm.sampling import SamplingParams

    if config.get("serving_threads"):
        serving_threads(config["threads"])
    else:
        torch.set_num_threads(config["threads"])
    if config.get("main_parallel_op"):
        torch.ones(512, 128) + torch.ones(512, 128)  # large enough to run in parallel
    from lm.tokenizers import CharTokenizer

    tokenizer = CharTokenizer.train("ROMEO: What light through yonder window breaks?\n")
    model = reference_gpt(tokenizer.vocab_size).eval()
    model.to(getattr(torch, config.get("model_dtype", "float32")))
    prompt = tokenizer.encode("ROMEO:\nWhat light through yonder window breaks?\n")

    def once() -> float:
        engine = Engine(
            model,
            tokenizer,
            max_batch=streams,
            max_queue=streams,
            threads=config["threads"],
            kv_cache_dtype=config.get("kv_cache_dtype", "auto"),
        )
        done, left = threading.Event(), [streams]

        def sink(out) -> None:
            if out.finish_reason is not None:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

        start = time.perf_counter()
        for i in range(streams):
            engine.submit(
                prompt[: len(prompt) - i % 16],
                SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i),
                sink,
            )
        if config["where"] == "thread":
            engine.start()
            done.wait()
            engine.shutdown()
        else:
            engine.run_until_idle()
        return streams * new_tokens / (time.perf_counter() - start)

    once()
    rate = once()
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    return {"tokens_per_s": rate, "rss_mb": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--config", help=argparse.SUPPRESS)  # one configuration, as JSON
    args = parser.parse_args()
    if args.config:
        print(json.dumps(run_config(json.loads(args.config), args.streams, args.new_tokens)))
        return
    rows = []
    for config in CONFIGS:
        env = {**os.environ, "LM_NATIVE": "1" if config.get("native", True) else "0"}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.engine_bench",
                "--streams",
                str(args.streams),
                "--new-tokens",
                str(args.new_tokens),
                "--config",
                json.dumps(config),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        row = {"config": config["name"], **json.loads(out.stdout.strip().splitlines()[-1])}
        print(row, flush=True)
        rows.append(row)
    save_result(
        "engine",
        {
            "command": f"python -m bench.engine_bench --streams {args.streams} "
            f"--new-tokens {args.new_tokens}",
            "streams": args.streams,
            "new_tokens": args.new_tokens,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
