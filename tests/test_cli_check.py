"""Poisoned weights never pass silently: `lm check` names them, `lm generate` and `lm serve`
refuse them with one line and exit status 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lm.checkpoint import shipped_checkpoints
from lm.cli import main

POISONED = "blocks.0.mlp.c_fc.weight"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, corpus_text, tiny_gpt_saver) -> Path:
    """A checkpoints directory with a good model ("good") and one holding a NaN ("poisoned")."""
    root = tmp_path_factory.mktemp("shipped")
    tiny_gpt_saver(root / "good", corpus_text)
    tiny_gpt_saver(root / "poisoned", corpus_text)
    weights = root / "poisoned" / "model.safetensors"
    tensors = load_file(weights)
    tensors[POISONED][3, 7] = float("nan")
    save_file(tensors, weights)
    return root


def test_check_names_the_bad_tensor_and_exits_non_zero(capsys, shipped, monkeypatch):
    monkeypatch.setenv("LM_CHECKPOINTS_DIR", str(shipped))
    status, out, err = run(capsys, "check")
    assert status == 1
    good, poisoned = out.strip().splitlines()
    assert good == "good: ok"
    assert poisoned.startswith(f"poisoned: {shipped / 'poisoned' / 'model.safetensors'}: ")
    assert f"'{POISONED}' holds 1 non-finite value (nan at [3, 7])" in poisoned
    assert err.strip() == "lm check: 1 of 2 checkpoints are bad"


def test_check_given_directories(capsys, shipped, tmp_path):
    status, out, _ = run(capsys, "check", str(shipped / "good"))
    assert (status, out) == (0, f"{shipped / 'good'}: ok\n")
    status, out, _ = run(capsys, "check", str(shipped / "good"), str(tmp_path))
    assert status == 1
    assert (
        out.splitlines()[1] == f"{tmp_path}: {tmp_path / 'config.json'}: missing; "
        f"{tmp_path} is not an lm checkpoint"
    )


def test_check_every_shipped_checkpoint_is_ok(capsys):
    names = shipped_checkpoints()
    if not names:
        pytest.skip("no shipped checkpoints in this install")
    status, out, _ = run(capsys, "check")
    assert status == 0
    assert out.splitlines() == [f"{name}: ok" for name in names]


def test_generate_refuses_a_poisoned_checkpoint_in_one_line(capsys, shipped):
    status, out, err = run(capsys, "generate", "We", "--checkpoint", str(shipped / "poisoned"))
    assert status == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("lm generate: error: ") and POISONED in err


def test_serve_refuses_to_start_with_a_poisoned_checkpoint(shipped):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm",
            "serve",
            "--checkpoint",
            str(shipped / "good"),
            "--checkpoint",
            str(shipped / "poisoned"),
            "--port",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("lm serve: error: ")
    assert str(shipped / "poisoned" / "model.safetensors") in line and POISONED in line
