"""matplotlib is optional (`lm[plot]`): without it training still works, plots fail clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lm.cli import main
from lm.plotting import MISSING

ROOT = Path(__file__).resolve().parents[1]
# `None` in sys.modules makes `import matplotlib` raise ImportError, as if not installed.
WITHOUT_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; from lm.cli import main; "


def test_training_without_matplotlib_skips_the_plot_with_one_warning(corpus_path, tmp_path):
    out = tmp_path / "run"
    argv = [
        "train",
        "--corpus",
        str(corpus_path),
        "--out",
        str(out),
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
        "4",
        "--eval-interval",
        "2",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-progress",
    ]
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB + f"sys.exit(main({argv!r}))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "saved in" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if MISSING in line]
    assert warnings == [f"{MISSING}; loss.png not written"], result.stderr  # once, not per eval
    assert "Traceback" not in result.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "loss.png").exists()


def test_fewshot_eval_plot_without_matplotlib_is_a_one_line_error_before_evaluating(
    monkeypatch, capsys, tmp_path
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    plot = tmp_path / "acc.png"
    code = main(["fewshot-eval", "--checkpoint", "no-such-checkpoint", "--plot", str(plot)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"lm fewshot-eval: error: {MISSING}"  # not the missing checkpoint
    assert not plot.exists()


def test_pyplot_draws_to_files_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    from lm.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "line.png")
    plt.close(fig)
    assert (tmp_path / "line.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
