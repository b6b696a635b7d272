"""Corpus -> token ids, the train/validation split, and batches for training and evaluation.

Training reads its token stream from a memory-mapped file of the smallest unsigned integer
type that holds the vocabulary (`token_file`), so a corpus larger than memory trains."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
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


def read_loss_mask(paths: Sequence[str | Path], corpus: Sequence[str | Path]) -> np.ndarray:
    """The loss mask of a corpus (`lm make-tasks --mask`): for each corpus file, a file of
    one byte per character, 1 where that character is a target the loss counts, 0 where it
    is not; joined as `read_corpus` joins the texts (the newline between files counts not)."""
    if len(paths) != len(corpus):
        raise LMError(
            f"{len(paths)} loss mask file(s) for {len(corpus)} corpus file(s); "
            "give one mask per corpus file, in the same order"
        )
    parts = []
    for i, (path, text_path) in enumerate(zip(map(Path, paths), corpus)):
        if not path.is_file():
            raise LMError(f"loss mask {path}: no such file")
        mask = np.fromfile(path, dtype=np.uint8)
        chars = len(read_corpus([text_path]))
        if len(mask) != chars:
            raise LMError(
                f"loss mask {path}: {len(mask):,} bytes for the {chars:,} characters of "
                f"{text_path}; it must hold one byte (0 or 1) per character"
            )
        if mask.size and mask.max() > 1:
            raise LMError(f"loss mask {path}: bytes must be 0 or 1, found {int(mask.max())}")
        parts.extend([np.zeros(1, np.uint8)] * (i > 0) + [mask])
    return np.concatenate(parts)


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


TokenArray = torch.Tensor | np.ndarray  # in memory, or a np.memmap of a token file


def as_long(ids: TokenArray) -> torch.Tensor:
    """Token ids (a tensor, or a slice of a token file) as an int64 tensor for the model."""
    if isinstance(ids, torch.Tensor):
        return ids.long()
    return torch.from_numpy(np.asarray(ids, dtype=np.int64))


IGNORE = -100  # the target of a position no loss counts (F.cross_entropy's ignore_index)


def masked(targets: torch.Tensor, mask: np.ndarray | None) -> torch.Tensor:
    """`targets` with IGNORE where the loss mask (same shape) is 0; as is without a mask."""
    if mask is None:
        return targets
    return targets.masked_fill(torch.from_numpy(np.asarray(mask) == 0), IGNORE)


def windows_at(
    data: TokenArray, starts: torch.Tensor, block_size: int, mask: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows beginning at `starts`: inputs and next-token targets, each [batch, block]
    (targets the loss `mask` leaves out are IGNORE). Reads only those windows, so `data`
    may be a memory-mapped file."""
    if isinstance(data, torch.Tensor):
        rows = data[starts[:, None] + torch.arange(block_size + 1)]
    else:
        rows = data[starts.numpy()[:, None] + np.arange(block_size + 1)]
    rows = as_long(rows)
    if mask is not None:
        mask = mask[starts.numpy()[:, None] + np.arange(1, block_size + 1)]
    return rows[:, :-1], masked(rows[:, 1:], mask)


def random_windows(
    data: TokenArray, block_size: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows: inputs and next-token targets, each [batch, block]."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    return windows_at(data, starts, block_size)


class WindowSampler:
    """Random windows for (data-parallel, gradient-accumulating) training.

    Every optimizer step draws the starts of the whole global batch, `accum_steps x
    world_size x batch_size` windows, from a generator seeded alike on every rank; micro-step
    i of rank r reads its own slice of that draw. So no two ranks read the same draw, and
    together they read exactly the windows one process with the global batch would.
    """

    def __init__(
        self,
        data: TokenArray,
        block_size: int,
        batch_size: int,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
        mask: np.ndarray | None = None,
    ):
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.mask = mask
        self.generator, self.rank, self.world_size = generator, rank, world_size
        self.accum_steps = accum_steps
        self.micro_step = 0  # 0 between optimizer steps, when resume state is saved
        self.starts = torch.empty(0, dtype=torch.long)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch."""
        if self.micro_step == 0:
            count = self.accum_steps * self.world_size * self.batch_size
            self.starts = torch.randint(
                len(self.data) - self.block_size, (count,), generator=self.generator
            ).view(self.accum_steps, self.world_size, self.batch_size)
        starts = self.starts[self.micro_step, self.rank]
        self.micro_step = (self.micro_step + 1) % self.accum_steps
        return windows_at(self.data, starts, self.block_size, self.mask)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id of the vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise LMError(f"a vocabulary of {vocab_size} tokens does not fit 32-bit token ids")


def cache_dir() -> Path:
    """Where token files are kept: $LM_CACHE_DIR, else $XDG_CACHE_HOME/lm, else ~/.cache/lm."""
    env = os.environ.get("LM_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lm"


def token_file(tokenizer, text: str, key: str, directory: Path | None = None) -> Path:
    """The path of `text` encoded by `tokenizer` as a token file (see `write_tokens`), named by
    `key` (say the corpus hash and split) plus a hash of the tokenizer, so that another
    tokenizer never reads it. Written only if it is not there yet."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(Path(tmp))
        digest = hashlib.sha256()
        for path in sorted(Path(tmp).iterdir()):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    dtype = token_dtype(tokenizer.vocab_size)
    name = f"{key}-{tokenizer.kind}-{digest.hexdigest()[:16]}.{dtype.name}"
    path = (directory or cache_dir() / "tokens") / name
    if not path.is_file():
        write_tokens(tokenizer, text, path)
    return path


def write_tokens(tokenizer, text: str, path: Path, chunk_chars: int = 1 << 20) -> None:
    """Encode `text` piece by piece into a flat file of `token_dtype` ids, written to a
    temporary file and renamed into place, so that a reader never sees half a file and no
    int64 copy of the corpus is ever made. Pieces end at a newline followed by a
    non-space character, where every tokenizer here splits alike."""
    dtype = token_dtype(tokenizer.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-" + path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in _pieces(text, chunk_chars):
                np.asarray(tokenizer.encode(piece), dtype=dtype).tofile(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pieces(text: str, size: int) -> Iterator[str]:
    """Pieces of about `size` characters, each ending at a newline that a non-space follows
    (or at the end of the text)."""
    start = 0
    while start < len(text):
        end = start + size
        while end < len(text):
            newline = text.find("\n", end - 1)
            if newline == -1:
                end = len(text)
            elif newline + 1 < len(text) and text[newline + 1].isspace():
                end = newline + 2  # look further
                continue
            else:
                end = newline + 1
            break
        yield text[start:end]
        start = end


def open_tokens(path: Path) -> np.ndarray:
    """A token file as a read-only memory map (its dtype from the file name)."""
    dtype = np.dtype(path.suffix.lstrip("."))
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class Streams:
    """Contiguous parallel streams for recurrent models (truncated BPTT).

    The data is cut into `batch_size` streams read in order, `block_size` tokens at a time,
    so the hidden state of row i carries over from one batch to the next.
    """

    def __init__(
        self,
        data: TokenArray,
        block_size: int,
        batch_size: int,
        mask: np.ndarray | None = None,
    ):
        length = (len(data) - 1) // batch_size
        if length <= block_size:
            raise LMError(
                f"corpus too short: {len(data)} tokens for {batch_size} streams of {block_size}"
            )
        self.x = data[: length * batch_size].reshape(batch_size, length)
        self.y = data[1 : length * batch_size + 1].reshape(batch_size, length)
        self.mask = None if mask is None else mask[1 : length * batch_size + 1]
        if self.mask is not None:
            self.mask = self.mask.reshape(batch_size, length)
        self.block_size = block_size
        self.position = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The next batch, and whether it starts a new pass (so the state must be reset)."""
        restart = self.position + self.block_size > self.x.shape[1]
        if restart:
            self.position = 0
        start, end = self.position, self.position + self.block_size
        self.position = end
        x, y = as_long(self.x[:, start:end]), as_long(self.y[:, start:end])
        y = masked(y, None if self.mask is None else self.mask[:, start:end])
        return x, y, restart or start == 0


def eval_windows(
    data: TokenArray, block_size: int, batch_size: int, mask: np.ndarray | None = None
) -> Iterator[tuple]:
    """Non-overlapping windows covering `data`, for a deterministic GPT evaluation; reads
    one batch of windows at a time, so `data` may be a memory-mapped file. Targets the
    loss `mask` leaves out are IGNORE."""
    n_windows = (len(data) - 1) // block_size
    for start in range(0, n_windows, batch_size):
        rows = min(batch_size, n_windows - start)
        first = start * block_size
        x = as_long(data[first : first + rows * block_size]).reshape(rows, block_size)
        y = as_long(data[first + 1 : first + rows * block_size + 1]).reshape(rows, block_size)
        if mask is not None:
            y = masked(y, mask[first + 1 : first + rows * block_size + 1].reshape(y.shape))
        yield x, y
