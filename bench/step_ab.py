"""The native decode step of two revisions in one process, alternated (kernel changes).

This machine's speed drifts by half over minutes, so runs minutes apart cannot tell a 10%
change. This builds `lm/native/decode.c` and `attention.c` of `--base` (a git revision)
and of the working tree, loads both libraries, and times them alternately on the same
packed weights and caches (the working tree's packing and cache layout; the default model;
random caches, bfloat16 or int8 (`--cache`), whose rows sit around each cell's position).
Medians over `--rounds`, and the base/new ratio per cell. Where the base reads the cache in
another layout, its timing is still that of its own reads; its logits then differ. Both
are built for this CPU, or for `LM_NATIVE_ARCH` (another -march: an AVX2 build, say).

    python -m bench.step_ab --base HEAD~1 [--cells 64@16,64@128,64@240,8@128,1@128]
        [--cache bfloat16|int8]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bench.common import ROOT
from lm import kv_int8
from lm.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from lm.native import load_library
from lm.native.decode import _cache_pointers, _model_pointers

SOURCES = ("lm/native/decode.c", "lm/native/attention.c")
CACHES = {
    "bfloat16": (torch.bfloat16, "lm_gpt_decode_bf16"),
    "int8": (torch.int8, "lm_gpt_decode_i8"),
}


def step_function(source: Path, cache: str):
    library = load_library(source, "the decode step")
    if library is None:
        raise SystemExit("no C compiler: nothing to compare")
    function = getattr(library, CACHES[cache][1])
    function.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64, ctypes.c_void_p]
    function.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return function


def cell_arguments(model, batch: int, position: int, cache: str):
    """The C step's arguments for `batch` rows around `position`, and what they point to."""
    c = model.config
    dtype = CACHES[cache][0]
    state = model.init_state(batch, "cpu", cache_dtype=dtype)
    keys = [state[f"k{layer}"] for layer in range(c.n_layer)]
    values = [state[f"v{layer}"] for layer in range(c.n_layer)]
    for tensor in keys + values:
        if dtype == torch.int8:  # random vectors with their scales
            head = c.n_embd // c.n_head
            tensor.copy_(kv_int8.quantize(torch.randn(*tensor.shape[:-1], head)))
        else:
            tensor.normal_()
    ids = torch.randint(0, c.vocab_size, (batch,))
    positions = torch.tensor([max(0, position - 8 + (i * 5) % 16) for i in range(batch)])
    logits = torch.empty(batch, c.vocab_size)
    packed = model._native_weights()
    key_pointers, value_pointers = _cache_pointers(keys, values)
    arguments = (
        *_model_pointers(packed),
        ids.data_ptr(),
        positions.data_ptr(),
        batch,
        key_pointers,
        value_pointers,
        keys[0].stride(0),
        logits.data_ptr(),
        torch.get_num_threads(),
    )
    return arguments, (packed, state, ids, positions, logits, key_pointers, value_pointers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a git revision")
    parser.add_argument("--cells", default="64@16,64@128,64@240,8@128,1@128")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per timing")
    parser.add_argument("--cache", choices=list(CACHES), default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_checkpoint(DEFAULT_CHECKPOINT).model
    with tempfile.TemporaryDirectory() as tmp:
        for source in SOURCES:
            text = subprocess.run(
                ["git", "show", f"{args.base}:{source}"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            (Path(tmp) / Path(source).name).write_text(text)
        steps = {
            "base": step_function(Path(tmp) / "decode.c", args.cache),
            "new": step_function(ROOT / SOURCES[0], args.cache),
        }
        print(
            f"base {args.base} against the working tree, {args.cache} cache; "
            f"medians of {args.rounds} rounds"
        )
        for cell in args.cells.split(","):
            batch, position = (int(n) for n in cell.split("@"))
            arguments, _keep = cell_arguments(model, batch, position, args.cache)
            times: dict[str, list[float]] = {name: [] for name in steps}
            for _ in range(args.rounds):
                for name, step in steps.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step(*arguments)
                    times[name].append((time.perf_counter() - start) / args.steps * 1000)
            base, new = (statistics.median(times[name]) for name in steps)
            print(
                f"batch {batch:3d} at {position:3d}: base {base:.3f} ms, new {new:.3f} ms, "
                f"base/new {base / new:.2f}x"
            )


if __name__ == "__main__":
    main()
