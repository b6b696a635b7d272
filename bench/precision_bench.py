"""What the narrower precisions of generation cost in quality: validation loss of decoding.

For each shipped GPT, 32 windows of the held-out 10% of Tiny Shakespeare are prefilled
with half a context and then decoded token by token to the end of the context, through
`step` as the engine runs it (compiled attention kernel on the CPU where it builds). The
loss is averaged over every predicted token. Configurations: the KV cache in float32,
float16, bfloat16 and int8 (a scale per head vector, `lm.kv_int8`), bfloat16 matrix products
in the prefill (`LM_BF16_PREFILL`, on CPUs that have them in hardware) and bfloat16 or int8
ones in the native decode step (`LM_DECODE_MATRICES`, where its build has them).

    python -m bench.precision_bench [--windows 32]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from bench.common import corpus_path, save_result
from lm import native
from lm.checkpoint import load_checkpoint
from lm.native import decode

CHECKPOINTS = ("shakespeare-char-gpt", "shakespeare-bpe-gpt")
CONFIGS = [  # (name, cache dtype, bfloat16 prefill, decode step's matrix products)
    ("float32 cache, float32 prefill", torch.float32, False, "float32"),
    ("float16 cache", torch.float16, False, "float32"),
    ("bfloat16 cache", torch.bfloat16, False, "float32"),
    ("bfloat16 cache, bfloat16 prefill", torch.bfloat16, True, "float32"),
    ("bfloat16 cache, prefill and decode products", torch.bfloat16, True, "bfloat16"),
    ("int8 cache (lm.kv_int8)", torch.int8, False, "float32"),
    (
        "int8 cache, bfloat16 prefill and decode products (lm serve's default)",
        torch.int8,
        True,
        "bfloat16",
    ),
    (
        "int8 cache, bfloat16 prefill, int8 decode products (--decode-matrices int8)",
        torch.int8,
        True,
        "int8",
    ),
]


def decode_loss(model, ids: torch.Tensor, windows: int, cache_dtype: torch.dtype) -> float:
    """Mean next-token loss over `windows` windows: prefill half a context, decode the rest."""
    context = model.config.block_size
    half = context // 2
    starts = torch.arange(windows) * ((len(ids) - context - 1) // windows)
    state = model.init_state(windows, cache_dtype=cache_dtype)
    with torch.inference_mode():
        logits, state = model.step(torch.stack([ids[s : s + half] for s in starts]), state)
        total = F.cross_entropy(logits, ids[starts + half], reduction="sum").item()
        for t in range(half, context - 1):
            logits, state = model.step(ids[starts + t][:, None], state)
            total += F.cross_entropy(logits, ids[starts + t + 1], reduction="sum").item()
    return total / (windows * (context - half))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    text = corpus_path().read_text(encoding="utf-8")
    held_out = text[int(len(text) * 0.9) :]
    rows = []
    for name in CHECKPOINTS:
        checkpoint = load_checkpoint(name)
        ids = torch.tensor(checkpoint.tokenizer.encode(held_out))
        reference = None
        for config, cache_dtype, bf16_prefill, matrices in CONFIGS:
            os.environ["LM_BF16_PREFILL"] = "1" if bf16_prefill else "0"
            os.environ["LM_DECODE_MATRICES"] = matrices
            native.bf16_matmul_is_fast.cache_clear()
            applied = bf16_prefill and native.bf16_matmul_is_fast()
            loss = decode_loss(checkpoint.model, ids, args.windows, cache_dtype)
            reference = loss if reference is None else reference
            row = {
                "checkpoint": name,
                "config": config,
                "loss": loss,
                "delta": loss - reference,
                "bf16_prefill_applied": applied,
                "decode_matrices": decode.decode_matrices(matrices),
                "native_kernel": native.decode_attention() is not None,
            }
            print(row, flush=True)
            rows.append(row)
    save_result(
        "precision",
        {
            "command": f"python -m bench.precision_bench --windows {args.windows}",
            "windows": args.windows,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
