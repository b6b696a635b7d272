"""Training faults: `lm train` killed with SIGKILL while it writes a checkpoint, a disk that
fills up while it saves (a real tmpfs, and an injected ENOSPC), and a loss that turns NaN:
what is on disk still loads, no temporary file is left, and `--resume` finishes the run."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lm.checkpoint import TRAIN_STATE_FILE, load_checkpoint, load_train_state
from lm.cli import main
from lm.train import TrainConfig, Trainer

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
        original = checkpoint._write_file
        def write_file(path, data):
            original(path, data)
            if str(path).endswith(".tmp"):
                calls["n"] += 1
                if calls["n"] == 2:
                    hang(path)
        checkpoint._write_file = write_file
    from lm.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def train_args(corpus: Path, out: Path) -> list[str]:
    return [
        "train",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--model",
        "gpt",
        "--n-layer",
        "1",
        "--n-embd",
        "16",
        "--n-head",
        "2",
        "--block-size",
        "16",
        "--batch-size",
        "4",
        "--max-steps",
        "30",
        "--eval-interval",
        "10",
        "--no-progress",
        "--threads",
        "1",
    ]


@pytest.mark.parametrize("target", ["weights", "train_state"])
def test_sigkill_while_saving_then_resume(tmp_path, corpus_path, target):
    out, ready = tmp_path / "run", tmp_path / "ready"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), target, str(ready), *train_args(corpus_path, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
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


# -- a full disk while saving ---------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    """Temporary files or directories a save may leave behind."""
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    status = main(argv)
    return status, capsys.readouterr().err


def wider_args(corpus: Path, out: Path, max_steps: int = 30) -> list[str]:
    """A model whose resume state (about 1.4 MB) outweighs the other files."""
    return [
        "train",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--model",
        "gpt",
        "--n-layer",
        "2",
        "--n-embd",
        "64",
        "--n-head",
        "2",
        "--block-size",
        "16",
        "--batch-size",
        "4",
        "--max-steps",
        str(max_steps),
        "--eval-interval",
        "10",
        "--no-progress",
        "--threads",
        "1",
        "--device",
        "cpu",
    ]


def first_checkpoint(corpus: Path, out: Path) -> None:
    """Train `wider_args` to its first checkpoint (step 10) and stop, as if interrupted."""
    config = TrainConfig(
        corpus=[str(corpus)],
        out=str(out),
        n_layer=2,
        n_embd=64,
        n_head=2,
        block_size=16,
        batch_size=4,
        max_steps=30,
        eval_interval=10,
        device="cpu",
        threads=1,
    )
    Trainer(config, progress=False).train(stop_at=10)


class Tmpfs:
    """A tmpfs mounted at `path`, resizable while mounted."""

    def __init__(self, path: Path):
        self.path = path

    def resize(self, size_bytes: int) -> None:
        kib = -(-size_bytes // 4096) * 4
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(self.path)], check=True)


@pytest.fixture
def tmpfs(tmp_path):
    """A 16 MB tmpfs at tmp_path/disk (skipped where mount is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
    try:
        yield Tmpfs(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_disk_stops_with_one_line_and_resumes(tmpfs, corpus_path, capsys):
    out = tmpfs.path / "run"
    first_checkpoint(corpus_path, out)
    used = shutil.disk_usage(tmpfs.path).used
    tmpfs.resize(used + used // 2)  # room for new weights, not for a second resume state

    status, err = run_cli(capsys, [*wider_args(corpus_path, out), "--resume"])
    assert status == 2
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith(f"lm train: error: disk full: no space left on {tmpfs.path} to write ")
    assert "free some space, then continue with --resume" in line
    assert leftovers(out) == []
    assert load_checkpoint(out).training["step"] in (10, 20)  # whole: old or new weights
    assert load_train_state(out / TRAIN_STATE_FILE)["step"] == 10

    tmpfs.resize(64 * 1024 * 1024)  # space freed: the run continues where it was saved
    status, err = run_cli(capsys, [*wider_args(corpus_path, out), "--resume"])
    assert status == 0, err
    assert load_checkpoint(out).training["finished"] is True
    assert leftovers(out) == []


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def fill_train_state(monkeypatch):
    """The next write of train_state.pt.tmp stops half-way with ENOSPC."""
    import lm.checkpoint as checkpoint

    original = checkpoint._write_file

    def write_file(path, data):
        if str(path).endswith(TRAIN_STATE_FILE + ".tmp"):
            original(path, bytes(data[: len(data) // 2]))
            raise _enospc(path)
        original(path, data)

    monkeypatch.setattr(checkpoint, "_write_file", write_file)


def fill_weights(monkeypatch):
    """The next weights file stops half-way, as safetensors reports a full disk."""
    import safetensors.torch as st
    from safetensors import SafetensorError

    original = st.save_model

    def save_model(model, filename, *args, **kwargs):
        original(model, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(st, "save_model", save_model)


@pytest.mark.parametrize("fill", [fill_train_state, fill_weights], ids=["train_state", "weights"])
def test_an_injected_enospc_stops_with_one_line_and_resumes(
    fill, tmp_path, corpus_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    first_checkpoint(corpus_path, out)
    before = (out / "model.safetensors").read_bytes()
    with monkeypatch.context() as patch:
        fill(patch)
        status, err = run_cli(capsys, [*wider_args(corpus_path, out), "--resume"])
    assert status == 2
    [line] = err.strip().splitlines()
    assert line.startswith("lm train: error: disk full: no space left on ")
    assert str(out) in line and "continue with --resume" in line
    assert leftovers(out) == []
    if fill is fill_weights:  # the weights being replaced are untouched
        assert (out / "model.safetensors").read_bytes() == before
    assert load_checkpoint(out).training["step"] in (10, 20)
    assert load_train_state(out / TRAIN_STATE_FILE)["step"] == 10

    status, err = run_cli(capsys, [*wider_args(corpus_path, out), "--resume"])
    assert status == 0, err
    assert load_checkpoint(out).training["finished"] is True


# -- a loss that is not finite ----------------------------------------------------------------


def poison_resume_state(out: Path) -> None:
    """One NaN in the weights the run resumes from: every later loss is NaN."""
    from lm.checkpoint import atomic_torch_save

    state = load_train_state(out / TRAIN_STATE_FILE)
    state["model"]["blocks.0.mlp.c_fc.weight"][3, 7] = float("nan")
    atomic_torch_save(state, out / TRAIN_STATE_FILE)


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_checkpoint(
    tmp_path, corpus_path, capsys
):
    out = tmp_path / "run"
    first_checkpoint(corpus_path, out)
    poison_resume_state(out)
    before = (out / "model.safetensors").read_bytes(), (out / TRAIN_STATE_FILE).read_bytes()
    status, err = run_cli(capsys, [*wider_args(corpus_path, out), "--resume"])
    assert status == 2
    [line] = err.strip().splitlines()
    assert re.fullmatch(
        r"lm train: error: training stopped: the loss is nan at step 11; "
        rf"the checkpoint in {re.escape(str(out))} \(best at step 10\) is kept\. "
        r"Lower --lr or --grad-clip and --resume, or pass --skip-nonfinite",
        line,
    )
    after = (out / "model.safetensors").read_bytes(), (out / TRAIN_STATE_FILE).read_bytes()
    assert after == before
    model = load_checkpoint(out).model
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_nonfinite_skips_the_batch_and_finishes(tmp_path, corpus_path, monkeypatch):
    config = TrainConfig(
        corpus=[str(corpus_path)],
        out=str(tmp_path / "run"),
        n_layer=1,
        n_embd=16,
        n_head=2,
        block_size=16,
        batch_size=4,
        max_steps=12,
        eval_interval=6,
        device="cpu",
        skip_nonfinite=True,
    )
    trainer = Trainer(config, progress=False)
    compute_loss, seen = trainer._loss, {}

    def loss_nan_at_step_4(*args):
        loss = compute_loss(*args)
        if trainer.step == 3:  # the 4th step: a poisoned batch
            seen["before"] = [p.detach().clone() for p in trainer.model.parameters()]
            return loss * float("nan")
        if "before" in seen and "after" not in seen:
            seen["after"] = [p.detach().clone() for p in trainer.model.parameters()]
        return loss

    monkeypatch.setattr(trainer, "_loss", loss_nan_at_step_4)
    summary = trainer.train()
    assert summary["finished"] is True and trainer.step == 12
    assert all(torch.equal(a, b) for a, b in zip(seen["before"], seen["after"]))  # no update
    model = load_checkpoint(tmp_path / "run").model
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_nonfinite_gives_up_when_every_batch_is_nan(tmp_path, corpus_path, capsys):
    out = tmp_path / "run"
    first_checkpoint(corpus_path, out)
    poison_resume_state(out)
    status, err = run_cli(capsys, [*wider_args(corpus_path, out), "--resume", "--skip-nonfinite"])
    assert status == 2
    [line] = err.strip().splitlines()
    assert "the loss was not finite for 11 steps in a row (up to step 21)" in line
