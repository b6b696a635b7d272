"""`lm train` killed with SIGKILL while it writes a checkpoint: what is on disk still loads,
and `--resume` finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lm.checkpoint import TRAIN_STATE_FILE, load_checkpoint, load_train_state
from lm.cli import main

# The child trains normally until its second checkpoint, then stops in the middle of
# writing one file of it (after writing half of it) and waits to be killed.
CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    import lm.checkpoint as checkpoint
    import safetensors.torch as st

    target, ready = sys.argv[1], Path(sys.argv[2])
    calls = {"n": 0}

    def hang(path):
        data = Path(path).read_bytes() if Path(path).exists() else b""
        Path(path).write_bytes(data[: len(data) // 2])  # a half-written file
        ready.write_text("writing")
        time.sleep(120)

    if target == "weights":
        original = st.save_model
        def save_model(model, filename, *args, **kwargs):
            calls["n"] += 1
            original(model, filename, *args, **kwargs)
            if calls["n"] == 2:
                hang(filename)
        st.save_model = save_model
    else:
        original = torch.save
        def save(obj, f, *args, **kwargs):
            original(obj, f, *args, **kwargs)
            if str(f).endswith(".tmp"):
                calls["n"] += 1
                if calls["n"] == 2:
                    hang(f)
        torch.save = save
    from lm.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def train_args(corpus: Path, out: Path) -> list[str]:
    return ["train", "--corpus", str(corpus), "--out", str(out), "--model", "gpt",
            "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
            "--batch-size", "4", "--max-steps", "30", "--eval-interval", "10", "--no-progress",
            "--threads", "1"]


@pytest.mark.parametrize("target", ["weights", "train_state"])
def test_sigkill_while_saving_then_resume(tmp_path, corpus_path, target):
    out, ready = tmp_path / "run", tmp_path / "ready"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), target, str(ready),
                              *train_args(corpus_path, out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not ready.exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.time() < deadline, "the child never reached its second checkpoint"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    # What is on disk is whole: the previous weights when they were being written (the
    # step-20 weights, written before the resume state, when that was), and the step-10
    # resume state either way.
    loaded = load_checkpoint(out)
    assert loaded.training["step"] == (10 if target == "weights" else 20)
    assert load_train_state(out / TRAIN_STATE_FILE)["step"] == 10

    assert main([*train_args(corpus_path, out), "--resume"]) == 0
    finished = load_checkpoint(out)
    assert finished.training["finished"] is True
    assert not list(out.glob(".tmp-*"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 30  # the interrupted steps were redone once
