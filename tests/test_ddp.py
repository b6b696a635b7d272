"""Data-parallel training under torchrun (two CPU processes, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lm.checkpoint import load_checkpoint


@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_two_processes_train_one_checkpoint(tmp_path, corpus_path, model):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "lm", "train", "--corpus", str(corpus_path), "--out", str(out),
         "--model", model, "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
         "--block-size", "16", "--batch-size", "4", "--max-steps", "8", "--eval-interval", "4",
         "--no-progress", "--threads", "1"],
        capture_output=True, text=True, timeout=120, env=env)
    # The head of stderr holds a rank's own error; torchrun's summary follows it.
    assert result.returncode == 0, result.stderr[:3000]
    checkpoint = load_checkpoint(out)
    assert checkpoint.training["world_size"] == 2
    assert checkpoint.training["finished"] is True
    assert result.stdout.count("best validation loss") == 1  # only rank 0 reports and writes
