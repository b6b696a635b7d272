"""Shared helpers for the benchmarks: where results go and how they are written."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATA_DIR = Path(os.environ.get("LM_DATA_DIR", ROOT / "data"))


@contextmanager
def environment(name: str, value: str | None, *caches: Callable) -> Iterator[None]:
    """`name` set to `value` (None: left as it is) for the block, then put back as it was;
    each of `caches` (a functools cache that reads the variable) cleared on entry and exit."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    for cache in caches:
        cache.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved
        for cache in caches:
            cache.cache_clear()


def corpus_path() -> Path:
    path = DATA_DIR / "tinyshakespeare.txt"
    if not path.is_file():
        raise SystemExit(f"reference corpus not found at {path}; set LM_DATA_DIR")
    return path


def reference_gpt(vocab_size: int):
    """The benchmarks' reference GPT: 4 layers, 4 heads, 128 wide, context 256, random
    weights from seed 0 (which cost the same to run as trained ones)."""
    import torch

    from lm.models import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig(
        kind="gpt", vocab_size=vocab_size, n_layer=4, n_head=4, n_embd=128, block_size=256
    )
    return build_model(config)


def save_reference_gpt(directory: Path) -> Path:
    """The reference GPT with a character tokenizer of the reference corpus, saved as a
    checkpoint in `directory`."""
    from lm.checkpoint import save_checkpoint
    from lm.tokenizers import CharTokenizer

    tokenizer = CharTokenizer.train(corpus_path().read_text(encoding="utf-8"))
    save_checkpoint(directory, reference_gpt(tokenizer.vocab_size), tokenizer, {})
    return directory


def machine() -> str:
    """Cores, CPU model and its widest vector unit: machines of one model name here have
    been AVX2-only or AVX-512 with bfloat16, about twice as fast for lm."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if cpu and flags:
                break
    except OSError:
        pass
    vector = next(
        (
            name
            for flag, name in (
                ("amx_bf16", "AMX"),
                ("avx512_bf16", "AVX-512 with BF16"),
                ("avx512f", "AVX-512"),
                ("avx2", "AVX2"),
            )
            if flag in flags
        ),
        None,
    )
    return f"{os.cpu_count()} cores, {cpu}" + (f" ({vector})" if vector else "")


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_result(name: str, result: dict) -> Path:
    """Write a benchmark's result as JSON (the markdown report is built from these)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "revision": git_revision(),
        **result,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
