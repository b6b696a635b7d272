"""Corpus -> token ids, the train/validation split, and batches for training and evaluation."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from lm.errors import LMError


def read_corpus(paths: Sequence[str | Path]) -> str:
    """Read and join UTF-8 text files; a clear error for missing, empty or non-UTF-8 files."""
    if not paths:
        raise LMError("no corpus given; pass --corpus PATH")
    parts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise LMError(f"corpus {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise LMError(f"corpus {path}: not UTF-8 text (byte {exc.start})") from exc
        if not text.strip():
            raise LMError(f"corpus {path}: empty")
        parts.append(text)
    return "\n".join(parts)


def corpus_hash(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Hold out the tail of the corpus (nanoGPT's 90/10 split), by characters."""
    if not 0.0 < val_fraction < 1.0:
        raise LMError(f"validation fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def to_tensor(ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def random_windows(
    data: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows: inputs and next-token targets, each [batch, block]."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size)
    x = data[starts[:, None] + offsets]
    y = data[starts[:, None] + offsets + 1]
    return x, y


class Streams:
    """Contiguous parallel streams for recurrent models (truncated BPTT).

    The data is cut into `batch_size` streams read in order, `block_size` tokens at a time,
    so the hidden state of row i carries over from one batch to the next.
    """

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int):
        length = (len(data) - 1) // batch_size
        if length <= block_size:
            raise LMError(
                f"corpus too short: {len(data)} tokens for {batch_size} streams of {block_size}"
            )
        self.x = data[: length * batch_size].view(batch_size, length)
        self.y = data[1 : length * batch_size + 1].view(batch_size, length)
        self.block_size = block_size
        self.position = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The next batch, and whether it starts a new pass (so the state must be reset)."""
        restart = self.position + self.block_size > self.x.shape[1]
        if restart:
            self.position = 0
        start, end = self.position, self.position + self.block_size
        self.position = end
        return self.x[:, start:end], self.y[:, start:end], restart or start == 0


def eval_windows(data: torch.Tensor, block_size: int, batch_size: int) -> Iterator[tuple]:
    """Non-overlapping windows covering `data`, for a deterministic GPT evaluation."""
    n_windows = (len(data) - 1) // block_size
    xs = data[: n_windows * block_size].view(n_windows, block_size)
    ys = data[1 : n_windows * block_size + 1].view(n_windows, block_size)
    for start in range(0, n_windows, batch_size):
        yield xs[start : start + batch_size], ys[start : start + batch_size]
