"""Decode throughput: lm's engine vs Hugging Face `transformers` generate, same run.

Reference GPT: 4 layers, 4 heads, 128 wide, character vocabulary (about 0.8M parameters),
block 256; also the shipped LSTM. Each stream starts from a short prompt and makes
`--new-tokens` tokens by sampling (temperature 1). Tokens/s counts generated tokens over
wall time, prefill included.

The "native step" rows time a bare `GPT.step` of the shipped char GPT (`--step-gpt`, or
random weights of its shape) per decode step, through the compiled whole-model step
(`lm.native.decode`) in float32, with bfloat16 products (where the build has them) and
through the PyTorch path, over a float32 cache; with bfloat16 products over a bfloat16 and
an int8 cache (`lm.kv_int8`, lm serve's default); and with int8 products over the int8
cache (`--decode-matrices int8`, where the build has them), interleaved, rows at positions
spread over the context, in one thread, as CPU time (meaningful even on a busy machine).

    python -m bench.decode_bench [--streams 1,8,32,64] [--new-tokens 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import corpus_path, environment, reference_gpt, save_result
from lm.checkpoint import load_checkpoint
from lm.engine import Engine
from lm.models import ModelConfig, build_model
from lm.sampling import SamplingParams
from lm.tokenizers import CharTokenizer


def lm_engine_rate(model, tokenizer, streams: int, new_tokens: int, prompt: str) -> float:
    engine = Engine(model, tokenizer, max_batch=streams, max_queue=streams)
    ids = tokenizer.encode(prompt)
    start = time.perf_counter()
    seqs = [
        engine.submit(ids, SamplingParams(max_new_tokens=new_tokens, seed=i))
        for i in range(streams)
    ]
    engine.run_until_idle()
    elapsed = time.perf_counter() - start
    return sum(len(s.generated) for s in seqs) / elapsed


def step_ms(
    model,
    batch: int,
    native: bool,
    steps: int,
    matrices: str = "float32",
    cache_dtype: torch.dtype = torch.float32,
) -> float:
    """Median CPU milliseconds of one decode step of `batch` rows (positions spread out),
    in one thread: the thread's CPU time, so that other work on a busy machine does not
    count (its cache pollution still does). `matrices`: the native step's products
    (`LM_DECODE_MATRICES`)."""
    import lm.models.gpt as gpt

    context = model.config.block_size
    state = model.init_state(batch, cache_dtype=cache_dtype)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1))
    times = []
    original = gpt.decode_step
    if not native:
        gpt.decode_step = lambda: None
    try:
        with (
            torch.inference_mode(),
            environment("LM_DECODE_MATRICES", matrices),
        ):
            for i in range(steps):
                state["pos"] = (torch.arange(batch) * 7 + i) % (context - 1)
                start = time.thread_time()
                model.step(ids, state)
                times.append(time.thread_time() - start)
    finally:
        gpt.decode_step = original
    return 1000 * sorted(times)[len(times) // 2]


def native_step_row(model, batch: int, steps: int = 200, rounds: int = 5) -> dict:
    """The native step (float32, and bfloat16 products where the build has them) and the
    PyTorch step, interleaved over `rounds` (medians of medians); then the native step with
    lm serve's caches, bfloat16 and int8 (`lm.kv_int8`), bfloat16 products where built,
    and over the int8 cache with int8 products where built (`--decode-matrices int8`)."""
    from lm.native.decode import bf16_weights, i8_weights

    products = "bfloat16" if bf16_weights() else "float32"
    native, bf16, pytorch, i8 = [], [], [], []
    caches = {torch.bfloat16: [], torch.int8: []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            native.append(step_ms(model, batch, True, steps))
            if bf16_weights():
                bf16.append(step_ms(model, batch, True, steps, "bfloat16"))
            pytorch.append(step_ms(model, batch, False, steps))
            for dtype, times in caches.items():
                times.append(step_ms(model, batch, True, steps, products, dtype))
            if i8_weights():
                i8.append(step_ms(model, batch, True, steps, "int8", torch.int8))
    finally:
        torch.set_num_threads(threads)
    native_ms, pytorch_ms = sorted(native)[rounds // 2], sorted(pytorch)[rounds // 2]
    row = {
        "streams": batch,
        "native_step_ms": native_ms,
        "pytorch_step_ms": pytorch_ms,
        "native_speedup": pytorch_ms / native_ms,
    }
    if bf16:
        row["bf16_step_ms"] = sorted(bf16)[rounds // 2]
        row["bf16_speedup"] = native_ms / row["bf16_step_ms"]
    row["bf16_cache_step_ms"] = sorted(caches[torch.bfloat16])[rounds // 2]
    row["int8_cache_step_ms"] = sorted(caches[torch.int8])[rounds // 2]
    row["int8_cache_speedup"] = row["bf16_cache_step_ms"] / row["int8_cache_step_ms"]
    if i8:
        row["int8_products_step_ms"] = sorted(i8)[rounds // 2]
        row["int8_products_speedup"] = row["int8_cache_step_ms"] / row["int8_products_step_ms"]
    return row


def hf_rate(vocab_size: int, streams: int, new_tokens: int, prompt_len: int) -> float | None:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max(256, prompt_len + new_tokens),
        n_embd=128,
        n_layer=4,
        n_head=4,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(1, vocab_size, (streams, prompt_len))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=True)  # warm-up
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            top_k=0,
        )
        elapsed = time.perf_counter() - start
    return (out.shape[1] - prompt_len) * streams / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,8,32,64")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--lstm",
        default="shakespeare-char-lstm",
        help="shipped LSTM checkpoint to measure too ('' to skip)",
    )
    parser.add_argument(
        "--step-gpt",
        default="shakespeare-char-gpt",
        help="shipped GPT whose bare decode step is timed, native vs PyTorch ('' to skip)",
    )
    parser.add_argument("--step-streams", default="1,8,64")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    streams = [int(s) for s in args.streams.split(",") if s]  # "": step rows only
    text = corpus_path().read_text(encoding="utf-8")
    tokenizer = CharTokenizer.train(text)
    reference = reference_gpt(tokenizer.vocab_size).eval()
    prompt = "ROMEO:\n"
    rows = []
    lstm = None
    if args.lstm:
        try:
            lstm = load_checkpoint(args.lstm)
        except Exception as exc:  # noqa: BLE001 - report and go on without it
            print(f"skipping {args.lstm}: {exc}")
    for n in streams:
        row = {
            "streams": n,
            "lm_gpt": lm_engine_rate(reference, tokenizer, n, args.new_tokens, prompt),
            "hf_gpt2": hf_rate(tokenizer.vocab_size, n, args.new_tokens, len(prompt)),
        }
        if lstm is not None:
            row["lm_lstm"] = lm_engine_rate(lstm.model, lstm.tokenizer, n, args.new_tokens, prompt)
        if row["hf_gpt2"]:
            row["ratio_vs_hf"] = row["lm_gpt"] / row["hf_gpt2"]
        rows.append(row)
        print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    step_rows = []
    if args.step_gpt:
        try:
            step_model = load_checkpoint(args.step_gpt).model.eval()
        except Exception as exc:  # noqa: BLE001 - time random weights of its shape instead
            print(f"{args.step_gpt}: {exc}; timing random weights of its shape")
            step_model = build_model(
                ModelConfig(
                    kind="gpt", vocab_size=66, n_layer=6, n_embd=192, n_head=6, block_size=128
                )
            ).eval()
        for n in (int(s) for s in args.step_streams.split(",")):
            step_rows.append(native_step_row(step_model, n))
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in step_rows[-1].items()})
    save_result(
        "decode",
        {
            "command": "python -m bench.decode_bench "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
            "threads": args.threads,
            "new_tokens": args.new_tokens,
            "reference_params": reference.num_params(),
            "lstm": args.lstm if lstm is not None else None,
            "lstm_params": lstm.model.num_params() if lstm is not None else None,
            "rows": rows,
            "native_step": step_rows,
        },
    )


if __name__ == "__main__":
    main()
