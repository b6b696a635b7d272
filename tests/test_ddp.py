"""Data-parallel training under torchrun (two CPU processes, gloo), gradient accumulation
and the memory-mapped token file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from lm.checkpoint import load_checkpoint
from lm.data import open_tokens, token_dtype, token_file, write_tokens
from lm.errors import LMError
from lm.tokenizers import train_tokenizer
from lm.train import TrainConfig, Trainer


@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_two_processes_train_one_checkpoint(tmp_path, corpus_path, model):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "lm",
            "train",
            "--corpus",
            str(corpus_path),
            "--out",
            str(out),
            "--model",
            model,
            "--n-layer",
            "1",
            "--n-embd",
            "16",
            "--n-head",
            "2",
            "--block-size",
            "16",
            "--batch-size",
            "2",
            "--grad-accum-steps",
            "2",
            "--max-steps",
            "8",
            "--eval-interval",
            "4",
            "--no-progress",
            "--threads",
            "1",
            "--device",
            "cpu",  # two CPU processes, also where a GPU is present
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    # The head of stderr holds a rank's own error; torchrun's summary follows it.
    assert result.returncode == 0, result.stderr[:3000]
    checkpoint = load_checkpoint(out)
    assert checkpoint.training["world_size"] == 2
    assert checkpoint.training["settings"]["grad_accum_steps"] == 2
    assert checkpoint.training["finished"] is True
    assert result.stdout.count("best validation loss") == 1  # only rank 0 reports and writes


# -- equalities, through a worker that saves every rank's parameters ----------------------

WORKER = Path(__file__).with_name("ddp_worker.py")
SETTINGS = dict(
    tokenizer="char",
    model="gpt",
    n_layer=1,
    n_embd=16,
    n_head=2,
    block_size=16,
    lr=1e-2,
    warmup_steps=2,
    max_steps=8,
    eval_interval=4,
    device="cpu",
    seed=3,
    threads=1,
)


def torchrun(corpus: Path, out: Path, stop_at: int = 0, **overrides) -> list[dict]:
    """Train on two CPU processes (gloo); each rank's parameters afterwards."""
    settings = {**SETTINGS, "corpus": [str(corpus)], "out": str(out), **overrides}
    dump = out.with_name(out.name + "-params")
    dump.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(WORKER),
            json.dumps(settings),
            str(stop_at),
            str(dump),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[:3000]
    return [torch.load(dump / f"rank{rank}.pt") for rank in (0, 1)]


def one_process(corpus: Path, out: Path, **overrides) -> dict:
    settings = {**SETTINGS, "corpus": [str(corpus)], "out": str(out), **overrides}
    trainer = Trainer(TrainConfig.from_dict(settings), progress=False)
    trainer.train()
    return trainer.model.state_dict()


def train_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, corpus_text):
    """2 ranks x batch 2 x 2 accumulated micro-batches: a global batch of 8."""
    tmp = tmp_path_factory.mktemp("ddp")
    corpus = tmp / "corpus.txt"
    corpus.write_text(corpus_text, encoding="utf-8")
    out = tmp / "run"
    return corpus, out, torchrun(corpus, out, batch_size=2, grad_accum_steps=2)


def test_both_ranks_end_with_identical_parameters(two_ranks):
    _, _, (rank0, rank1) = two_ranks
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_two_ranks_match_one_process_with_the_same_global_batch(two_ranks, tmp_path):
    corpus, out, (rank0, _) = two_ranks
    single = one_process(corpus, tmp_path / "one", batch_size=8)
    assert_close(rank0, single, rtol=1e-4, atol=1e-4)
    ddp_losses, single_losses = train_losses(out), train_losses(tmp_path / "one")
    assert ddp_losses.keys() == single_losses.keys() and ddp_losses
    for step, loss in single_losses.items():
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-5)
    assert load_checkpoint(out).training["world_size"] == 2


def test_grad_accumulation_equals_a_bigger_batch(tmp_path, corpus_path):
    accumulated = one_process(corpus_path, tmp_path / "accum", batch_size=4, grad_accum_steps=2)
    bigger = one_process(corpus_path, tmp_path / "big", batch_size=8)
    assert_close(accumulated, bigger, rtol=1e-4, atol=1e-5)
    assert train_losses(tmp_path / "accum") == pytest.approx(train_losses(tmp_path / "big"))


def test_two_ranks_interrupted_and_resumed_equal_an_uninterrupted_run(tmp_path, corpus_path):
    # Dropout draws from each rank's own torch RNG: a resume that gave every rank rank 0's
    # state would differ from the uninterrupted run.
    whole = torchrun(corpus_path, tmp_path / "whole", dropout=0.1)
    torchrun(corpus_path, tmp_path / "parts", stop_at=4, dropout=0.1)
    with pytest.raises(LMError, match="trained by 2 process"):  # one process cannot resume it
        one_process(corpus_path, tmp_path / "parts", dropout=0.1, resume=True)
    resumed = torchrun(corpus_path, tmp_path / "parts", dropout=0.1, resume=True)
    for rank in (0, 1):
        assert_close(resumed[rank], whole[rank], rtol=0, atol=0)
    assert train_losses(tmp_path / "parts")[8] == train_losses(tmp_path / "whole")[8]


# -- the token file -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vocab_size", "dtype"),
    [
        (2, np.uint8),
        (256, np.uint8),
        (257, np.uint16),
        (65536, np.uint16),
        (65537, np.uint32),
        (2**32, np.uint32),
    ],
)
def test_token_dtype_is_the_smallest_that_holds_the_vocabulary(vocab_size, dtype):
    assert token_dtype(vocab_size) == dtype


def test_token_dtype_refuses_a_vocabulary_past_32_bits():
    with pytest.raises(LMError, match="32-bit"):
        token_dtype(2**32 + 1)


@pytest.mark.parametrize(
    ("kind", "vocab_size", "dtype"),
    [
        ("char", None, np.uint8),
        ("word", None, np.uint8),
        ("bpe", 300, np.uint16),
        ("spm", 400, np.uint16),
    ],
)
def test_token_file_holds_the_encoding_in_the_smallest_type(
    tmp_path, corpus_text, kind, vocab_size, dtype
):
    tokenizer = train_tokenizer(kind, corpus_text, vocab_size)
    path = token_file(tokenizer, corpus_text, "key", tmp_path)
    ids = open_tokens(path)
    assert isinstance(ids, np.memmap) and ids.dtype == dtype
    assert ids.tolist() == tokenizer.encode(corpus_text)  # written in pieces, encoded as one
    write_tokens(tokenizer, corpus_text, tmp_path / "small-pieces", chunk_chars=40)
    assert np.fromfile(tmp_path / "small-pieces", dtype=dtype).tolist() == ids.tolist()
    mtime = path.stat().st_mtime_ns
    assert token_file(tokenizer, corpus_text, "key", tmp_path) == path  # cached, not rewritten
    assert path.stat().st_mtime_ns == mtime
    other = train_tokenizer(kind, corpus_text.upper(), vocab_size)
    assert token_file(other, corpus_text, "key", tmp_path) != path  # keyed by the tokenizer
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_trainer_reads_both_splits_from_token_files(tmp_path, corpus_path):
    trainer = Trainer(
        TrainConfig.from_dict(
            {**SETTINGS, "corpus": [str(corpus_path)], "out": str(tmp_path / "run")}
        ),
        progress=False,
    )
    assert isinstance(trainer.train_ids, np.memmap) and trainer.train_ids.dtype == np.uint8
    assert isinstance(trainer.val_ids, np.memmap) and trainer.val_ids.dtype == np.uint8
    assert Path(trainer.train_ids.filename).parent.parent == Path(os.environ["LM_CACHE_DIR"])
