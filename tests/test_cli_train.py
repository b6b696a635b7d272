"""`lm train` and `lm eval` from the command line: one-line errors, recipes, JSON output."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm.checkpoint import save_checkpoint
from lm.cli import main
from lm.models import ModelConfig, build_model
from lm.tokenizers import train_tokenizer

TINY = [
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
    "--no-progress",
]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, command: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lm {command}: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


# -- python -m lm -------------------------------------------------------------------------


def test_python_dash_m_lm_runs_the_cli_with_its_exit_codes(tmp_path):
    """`python -m lm` is the `lm` command (so `torchrun -m lm train` works too)."""
    missing = tmp_path / "nope.txt"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm",
            "eval",
            "--checkpoint",
            str(tmp_path),
            "--corpus",
            str(missing),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lm eval: error: "), result.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "lm", "checkpoints", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0
    assert isinstance(json.loads(listed.stdout), list)


def test_train_choices_are_the_registries():
    from lm.cli import build_parser
    from lm.models import MODELS
    from lm.tokenizers import TOKENIZERS

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {a.dest: a.choices for a in train._actions if a.choices}
    assert choices["tokenizer"] == list(TOKENIZERS)
    assert choices["model"] == list(MODELS)


def test_train_unknown_kind_in_a_recipe_is_one_line(capsys, tmp_path, corpus_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'corpus = "{corpus_path}"\ntokenizer = "morse"\n')
    code, _, err = run(capsys, "train", "--config", recipe, "--out", tmp_path / "run", *TINY)
    assert_one_line_error(code, err, "train", "unknown tokenizer 'morse'", "char, word, bpe, spm")
    recipe.write_text(f'corpus = "{corpus_path}"\nmodel = "transformer"\n')
    code, _, err = run(capsys, "train", "--config", recipe, "--out", tmp_path / "run", *TINY)
    assert_one_line_error(code, err, "train", "unknown model 'transformer'", "rnn, gru, lstm, gpt")


# -- lm train: user mistakes ---------------------------------------------------------------


def test_train_missing_corpus(capsys, tmp_path):
    missing = tmp_path / "nope.txt"
    code, _, err = run(capsys, "train", "--corpus", missing, "--out", tmp_path / "run", *TINY)
    assert_one_line_error(code, err, "train", str(missing), "no such file")
    assert not (tmp_path / "run").exists()


def test_train_empty_corpus(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    code, _, err = run(capsys, "train", "--corpus", empty, "--out", tmp_path / "run", *TINY)
    assert_one_line_error(code, err, "train", str(empty), "empty")
    assert not (tmp_path / "run").exists()


def test_train_non_utf8_corpus(capsys, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Voilà, un café. ".encode("latin-1") * 50)
    code, _, err = run(capsys, "train", "--corpus", latin1, "--out", tmp_path / "run", *TINY)
    assert_one_line_error(code, err, "train", str(latin1), "not UTF-8")


def test_train_corpus_shorter_than_a_block(capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.\n" * 3)
    code, _, err = run(
        capsys, "train", "--corpus", short, "--out", tmp_path / "run", *TINY, "--block-size", "128"
    )
    assert_one_line_error(code, err, "train", "corpus too short", "--block-size")
    assert not (tmp_path / "run").exists()


def test_train_n_embd_not_divisible_by_n_head(capsys, corpus_path, tmp_path):
    code, _, err = run(
        capsys,
        "train",
        "--corpus",
        corpus_path,
        "--out",
        tmp_path / "run",
        *TINY,
        "--n-embd",
        "30",
        "--n-head",
        "4",
    )
    assert_one_line_error(code, err, "train", "--n-embd (30)", "--n-head (4)")


def test_train_spm_vocabulary_too_small(capsys, corpus_path, tmp_path):
    code, _, err = run(
        capsys,
        "train",
        "--corpus",
        corpus_path,
        "--out",
        tmp_path / "run",
        *TINY,
        "--tokenizer",
        "spm",
        "--vocab-size",
        "100",
    )
    assert_one_line_error(code, err, "train", "--vocab-size 100")


@pytest.mark.parametrize("flag", [["--model", "transformer"], ["--n-layer", "0"]])
def test_train_bad_flag_values_are_usage_errors(capsys, corpus_path, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--corpus", str(corpus_path), *flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag[0] in err and "Traceback" not in err


def test_train_unknown_recipe_key(capsys, corpus_path, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('corpus = "corpus.txt"\nlearning_rate = 0.1\n')
    code, _, err = run(capsys, "train", "--config", recipe, *TINY)
    assert_one_line_error(code, err, "train", "learning_rate")


# -- lm eval: damaged or foreign checkpoints ------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus_text) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    tokenizer = train_tokenizer("char", corpus_text)
    torch.manual_seed(0)
    config = ModelConfig(
        kind="gpt", vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=16
    )
    save_checkpoint(directory, build_model(config), tokenizer, training={"val_fraction": 0.1})
    return directory


@pytest.fixture
def damaged(checkpoint, tmp_path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(checkpoint, copy)
    return copy


def test_train_refuses_an_out_dir_holding_a_checkpoint(capsys, corpus_path, damaged):
    before = digests(damaged)
    code, _, err = run(capsys, "train", "--corpus", corpus_path, "--out", damaged, *TINY)
    assert_one_line_error(
        code, err, "train", str(damaged), "already holds a checkpoint", "--resume"
    )
    assert digests(damaged) == before


def _set_model_field(directory: Path, **changes) -> None:
    meta = json.loads((directory / "config.json").read_text())
    meta["model"].update(changes)
    (directory / "config.json").write_text(json.dumps(meta))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _foreign(directory: Path) -> None:
    for path in directory.iterdir():
        path.unlink()
    (directory / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "n_embd": 768}')
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")


EVAL_DAMAGES = {
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
    "truncated weights": (
        lambda d: _truncate(d / "model.safetensors"),
        "model.safetensors: damaged",
    ),
    "garbage weights": (
        lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 4096),
        "model.safetensors: damaged",
    ),
    "wrong shapes": (lambda d: _set_model_field(d, n_embd=32), "does not match config.json"),
    "wrong vocabulary": (
        lambda d: _set_model_field(d, vocab_size=500),
        "does not match config.json",
    ),
    "foreign directory": (_foreign, "not an lm checkpoint"),
    "empty directory": (lambda d: [p.unlink() for p in d.iterdir()], "config.json: missing"),
}


@pytest.mark.parametrize("damage", EVAL_DAMAGES, ids=list(EVAL_DAMAGES))
def test_eval_damaged_checkpoint(capsys, damage, damaged, corpus_path):
    apply, message = EVAL_DAMAGES[damage]
    apply(damaged)
    code, out, err = run(capsys, "eval", "--checkpoint", damaged, "--corpus", corpus_path)
    assert_one_line_error(code, err, "eval", message)
    assert str(damaged) in err
    assert out == ""


def test_eval_unknown_checkpoint_name(capsys, corpus_path):
    code, _, err = run(capsys, "eval", "--checkpoint", "no-such-model", "--corpus", corpus_path)
    assert_one_line_error(code, err, "eval", "no-such-model")


def test_eval_missing_corpus(capsys, checkpoint, tmp_path):
    missing = tmp_path / "nope.txt"
    code, _, err = run(capsys, "eval", "--checkpoint", checkpoint, "--corpus", missing)
    assert_one_line_error(code, err, "eval", str(missing))


# -- happy path ----------------------------------------------------------------------------


def test_train_from_recipe_then_eval_json(capsys, corpus_path, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        "# paths are relative to the recipe\n"
        'corpus = "corpus.txt"\n'
        'out = "run"\n'
        'tokenizer = "char"\n'
        'model = "gpt"\n'
        "n_layer = 1\n"
        "n-embd = 16\n"  # dashed keys work as in the flags
        "n_head = 2\n"
        "block_size = 16\n"
        "batch_size = 4\n"
        "max_steps = 30\n"
        "eval_interval = 3\n"
        'device = "cpu"\n'
    )
    code, out, err = run(capsys, "train", "--config", recipe, "--max-steps", "6", "--no-progress")
    assert code == 0, err
    run_dir = tmp_path / "run"
    assert f"saved in {run_dir}" in out
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["training"]["settings"]["max_steps"] == 6  # the flag overrides the recipe
    assert meta["training"]["settings"]["eval_interval"] == 3  # the recipe overrides defaults
    assert meta["model"]["n_embd"] == 16

    code, out, err = run(capsys, "eval", "--checkpoint", run_dir, "--corpus", corpus_path, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"loss", "perplexity", "bpc", "tokens"}
    assert result["loss"] == pytest.approx(meta["training"]["val_loss"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bpc"] == pytest.approx(result["loss"] / math.log(2))  # char-level
    assert result["tokens"] == meta["training"]["val_tokens"]

    code, out, _ = run(
        capsys, "eval", "--checkpoint", run_dir, "--corpus", corpus_path, "--split", "all", "--json"
    )
    assert code == 0 and json.loads(out)["tokens"] > result["tokens"]


def test_a_recipe_finds_its_corpus_from_any_directory_and_records_only_its_name(
    capsys, corpus_path, tmp_path, monkeypatch
):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = recipes / "tiny.toml"
    recipe.write_text(f'corpus = ["../{corpus_path.name}"]\nout = "run"\ntokenizer = "char"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run(capsys, "train", "--config", recipe.resolve(), *TINY)
    assert code == 0, err
    training = json.loads((recipes / "run" / "config.json").read_text())["training"]
    assert training["corpus"] == [corpus_path.name]  # no path of this machine
    assert training["settings"]["corpus"] == [corpus_path.name]
    assert training["corpus_hash"].startswith("sha256:")
