"""A non-editable install works anywhere: the wheel carries the shipped checkpoints.

Builds the wheel from a copy of the source tree, installs it into a fresh virtual
environment that reuses this environment's dependencies (a .pth file; nothing is
downloaded), then generates and serves from an empty temporary directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import venv
import zipfile
from pathlib import Path

import httpx
import pytest

from lm.checkpoint import DEFAULT_CHECKPOINT, shipped_checkpoints, shipped_dir
from lm.cli import main

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "lm", "service", "checkpoints")
SERVING_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer.model",
    "README.md",
    "EXTRA.md",
    "recipe.toml",
}
PROMPT, NEW_TOKENS = "ROMEO:", 24


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment minus whatever would put the source tree's `lm` first."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "LM_CHECKPOINTS_DIR") and not k.startswith("PIP_")
    }
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", **extra)
    return env


def _run(args: list, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=_clean_env(**extra),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{args}: {result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built without network from a copy (the build writes build/ and egg-info)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "train_state.pt")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=skip)
        else:
            shutil.copy2(path, source / name)
    # a resume state beside a shipped model must stay out of the wheel
    (source / "checkpoints" / DEFAULT_CHECKPOINT / "train_state.pt").write_bytes(b"resume only")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            root / "dist",
            source,
        ],
        cwd=root,
    )
    (built,) = (root / "dist").glob("lm-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment holding the wheel; dependencies come from this one's."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=env_dir
    ).stdout.strip()
    # Appended after the new environment's own site-packages, so the wheel's lm wins; the
    # editable install's own .pth files there are not read (only site directories' are).
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(purelib, "_lm_test_deps.pth").write_text("\n".join(ours) + "\n", encoding="utf-8")
    _run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", wheel], cwd=env_dir)
    return env_dir


def _in_env(installed: Path, name: str) -> Path:
    return installed / ("Scripts" if os.name == "nt" else "bin") / name


def test_the_wheel_carries_only_the_serving_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = shipped_checkpoints()
    assert shipped, "no shipped checkpoints in the source tree"
    for name in shipped:
        expected = {p.name for p in (shipped_dir() / name).iterdir() if p.name in SERVING_FILES}
        packaged = {n.rsplit("/", 1)[1] for n in names if n.startswith(f"lm/checkpoints/{name}/")}
        assert packaged == expected, name
    assert not [n for n in names if n.endswith(("train_state.pt", "loss.png", "metrics.jsonl"))]
    assert "lm/native/attention.c" in names


def test_matplotlib_is_only_an_extra(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        requires = [
            line.split(":", 1)[1].strip()
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    matplotlib = [r for r in requires if r.startswith("matplotlib")]
    assert matplotlib and all("extra ==" in r for r in matplotlib), matplotlib
    assert any(r.startswith("matplotlib") and 'extra == "plot"' in r for r in requires)


def test_the_installed_lm_is_the_wheel_with_its_checkpoints(installed, tmp_path):
    python = _in_env(installed, "python.exe" if os.name == "nt" else "python")
    code = "import importlib.util; print(importlib.util.find_spec('lm').origin)"  # no torch import
    package = Path(_run([python, "-c", code], cwd=tmp_path).stdout.strip()).resolve().parent
    assert package.is_relative_to(installed.resolve()), package  # not the editable source tree
    assert sorted(p.name for p in (package / "checkpoints").iterdir()) == shipped_checkpoints()


def test_lm_generate_from_any_directory_matches_the_source_tree(installed, tmp_path, capsys):
    args = [
        "generate",
        PROMPT,
        "--temperature",
        "0",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    expected = capsys.readouterr().out
    result = _run([_in_env(installed, "lm"), *args], cwd=tmp_path)
    assert result.stdout == expected
    assert len(expected.strip()) > 0


def test_lm_serve_from_any_directory_answers_at_once(installed, tmp_path):
    from lm.checkpoint import load_checkpoint
    from lm.engine import SamplingParams
    from lm.generate import Generator

    expected = (
        Generator(load_checkpoint(DEFAULT_CHECKPOINT))
        .complete([PROMPT], SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0))[0]
        .text
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            _in_env(installed, "lm"),
            "serve",
            "--port",
            str(port),
            "--torch-threads",
            "1",
            "--device",
            "cpu",
        ],
        cwd=tmp_path,
        env=_clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "lm serve did not become healthy in 60 s"
            time.sleep(0.2)
        response = httpx.post(
            f"{url}/v1/completions",
            timeout=30,
            json={
                "model": DEFAULT_CHECKPOINT,
                "prompt": PROMPT,
                "max_tokens": NEW_TOKENS,
                "temperature": 0,
            },
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_pip_check_is_clean_with_the_wheel_installed(installed, tmp_path):
    python = _in_env(installed, "python.exe" if os.name == "nt" else "python")
    result = _run([python, "-m", "pip", "check"], cwd=tmp_path)
    assert "No broken requirements found" in result.stdout
