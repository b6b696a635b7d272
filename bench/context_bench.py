"""Engine speed as the context grows: the default model's shape (6 layers x 192, the shipped
char GPT's blocks) with a context of 128, 256 and 512 tokens.

For each context C, each of `--streams` sequences starts from a prompt of C/2 tokens and
makes C/2 - 1 new tokens, so the last steps attend over the whole context. Tokens/s counts
generated tokens over wall time, prefill included (2 threads, random weights of the
shipped model's configuration, which cost the same to run as trained ones).

    python -m bench.context_bench [--contexts 128,256,512] [--streams 1,64]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.common import corpus_path, save_result
from lm.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from lm.engine import Engine
from lm.models import ModelConfig, build_model
from lm.sampling import SamplingParams


def rate(model, tokenizer, context: int, streams: int, prompt_ids: list[int]) -> float:
    engine = Engine(model, tokenizer, max_batch=streams, threads=2, prefix_cache_mb=0)
    new = context // 2 - 1
    start = time.perf_counter()
    for i in range(streams):
        ids = prompt_ids[i : i + context // 2]  # different prompts: no shared prefixes
        engine.submit(ids, SamplingParams(max_new_tokens=new, temperature=1.0, seed=i))
    engine.run_until_idle()
    return streams * new / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="128,256,512")
    parser.add_argument("--streams", default="1,64")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    shipped = load_checkpoint(DEFAULT_CHECKPOINT)
    tokenizer = shipped.tokenizer
    text = corpus_path().read_text(encoding="utf-8")[:20_000]
    prompt_ids = tokenizer.encode(text)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        config = ModelConfig.from_dict({**shipped.config.to_dict(), "block_size": context})
        torch.manual_seed(0)
        model = build_model(config).eval()
        for streams in (int(s) for s in args.streams.split(",")):
            rates = [
                rate(model, tokenizer, context, streams, prompt_ids) for _ in range(args.rounds)
            ]
            row = {"context": context, "streams": streams, "tokens_per_s": max(rates)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    save_result(
        "context",
        {
            "command": f"python -m bench.context_bench --contexts {args.contexts} "
            f"--streams {args.streams} --rounds {args.rounds}",
            "model": {k: v for k, v in shipped.config.to_dict().items() if k != "block_size"},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
