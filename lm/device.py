"""Where models run: device choice, CPU thread counts and the KV-cache dtype.

The one place these decisions live; training, generation and the server all ask here.
"""

from __future__ import annotations

import os

import torch

from lm import native
from lm.errors import LMError

# "auto": int8 where decode attention runs in the compiled CPU kernel (lm.native) and the
# model is float32: each head vector's numbers in int8 and a float32 scale (lm.kv_int8), 36
# bytes a 32-number vector against bfloat16's 64 and float32's 128. Decode reads the whole
# cache every step, and at many rows the cache outgrows the CPU's caches: a decode step of
# 64 rows of the default model runs 1.21x faster than with bfloat16 (`python -m
# bench.decode_bench`), its validation loss moves by at most 0.00035 nats (`python -m
# bench.precision_bench`). "bfloat16" keeps 2-3 more digits; "float16" more still.
# Elsewhere "auto" is the model's own dtype.
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LMError("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise LMError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The dtype a model runs in for inference. `auto` is the checkpoint's own, float32:
    on the CPU the compiled kernels work in float32, and on a GPU the small models here
    decode faster in float32 than in bfloat16 (`python -m bench.cuda_bench`: 1,034
    against 788 tokens/s at batch 1 and 37,054 against 30,143 at batch 64 on an H200,
    for the shipped char GPT), whose validation loss bfloat16 raises by 0.00005."""
    if name not in MODEL_DTYPES:
        raise LMError(f"unknown dtype {name!r}; use {', '.join(MODEL_DTYPES)}")
    return torch.float32 if name == "auto" else getattr(torch, name)


def serving_threads(threads: int | None) -> int:
    """Keep the calling (main) thread to one CPU thread and return the count for the
    engine threads that run the models (default: one per core).

    OpenMP teams belong to the thread that starts parallel work: each engine thread sets
    its own count when it starts (`Engine(threads=...)`). Call this before any tensor work
    in the main thread: once the main thread has run a parallel op with 2 threads, an
    engine thread's 2-thread steps run at half speed on 2 cores (`python -m
    bench.engine_bench`: 10,993 against 24,389 tokens/s at 64 streams).
    """
    count = threads or max(1, os.cpu_count() or 1)
    torch.set_num_threads(1)
    return count


def resolve_kv_cache_dtype(
    model: torch.nn.Module, device: torch.device, requested: str = "auto"
) -> torch.dtype | None:
    """The KV cache dtype a GPT gets for `requested` (None for models without a cache)."""
    if getattr(model, "context_size", None) is None:
        return None
    if requested != "auto":
        return getattr(torch, requested)
    model_dtype = next(model.parameters()).dtype
    if (
        device.type == "cpu"
        and model_dtype == torch.float32
        and native.decode_attention() is not None
    ):
        return torch.int8
    return model_dtype
