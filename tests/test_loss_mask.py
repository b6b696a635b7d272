"""Loss on marked characters only: `lm make-tasks --mask`, `lm train --loss-mask`, `lm eval
--loss-mask` (issue 13: the answers of few-shot episodes, not their random inputs)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_train_config

from lm.checkpoint import load_checkpoint
from lm.cli import main
from lm.data import IGNORE, eval_windows, read_loss_mask, windows_at
from lm.errors import LMError
from lm.evaluate import evaluate, evaluate_checkpoint
from lm.train import TrainConfig, Trainer


def copy_corpus(lines: int = 1500, seed: int = 0) -> tuple[str, bytes]:
    """`abc=abc` lines: the copy after `=` and the line end are marked (predictable), the
    random letters before it are not."""
    rng = random.Random(seed)
    text, mask = [], []
    for _ in range(lines):
        word = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=3))
        text.append(f"{word}={word}\n")
        mask.append(bytes(4) + b"\1" * 4)
    return "".join(text), b"".join(mask)


@pytest.fixture
def masked_corpus(tmp_path: Path) -> tuple[Path, Path, str, bytes]:
    text, mask = copy_corpus()
    corpus, mask_path = tmp_path / "copy.txt", tmp_path / "copy.mask"
    corpus.write_text(text, encoding="utf-8")
    mask_path.write_bytes(mask)
    return corpus, mask_path, text, mask


def config(corpus: Path, mask: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(block_size=32, max_steps=40, eval_interval=20) | overrides
    return tiny_train_config(corpus, out, loss_mask=[str(mask)], **settings)


# -- masked windows, loss and evaluation --------------------------------------------------


def test_masked_windows_ignore_exactly_the_unmarked_targets():
    data = np.arange(100, dtype=np.uint8)
    mask = (np.arange(100) % 3 == 0).astype(np.uint8)
    starts = torch.tensor([0, 5, 40])
    x, y = windows_at(data, starts, 10, mask)
    x0, y0 = windows_at(data, starts, 10)
    assert torch.equal(x, x0)
    targets = y0.numpy()
    assert torch.equal(y, torch.from_numpy(np.where(targets % 3 == 0, targets, IGNORE)))
    (x1, y1), *_ = eval_windows(data, 10, 4, mask)
    assert torch.equal(y1[y1 != IGNORE] % 3, torch.zeros_like(y1[y1 != IGNORE]))
    assert int((y1 != IGNORE).sum()) == int(mask[1:41].sum())


def test_training_loss_is_the_mean_over_marked_targets(masked_corpus, tmp_path):
    corpus, mask_path, *_ = masked_corpus
    trainer = Trainer(config(corpus, mask_path, tmp_path / "run"), progress=False)
    x, y, _ = trainer._batch()
    assert (y == IGNORE).any() and (y != IGNORE).any()
    with torch.no_grad():
        loss = trainer._loss(x, y, False)
        logits = trainer.model(x).flatten(0, 1)
    counted = y.flatten() != IGNORE
    expected = F.cross_entropy(logits[counted], y.flatten()[counted])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with torch.no_grad():  # a batch with nothing marked: zero, not NaN
        assert trainer._loss(x, torch.full_like(y, IGNORE), False).item() == 0.0


@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_masked_run_reports_the_marked_loss_and_learns_the_answers(model, masked_corpus, tmp_path):
    corpus, mask_path, text, mask = masked_corpus
    Trainer(
        config(corpus, mask_path, tmp_path / "run", model=model, max_steps=60), progress=False
    ).train()
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.training["settings"]["loss_mask"] == ["copy.mask"]
    marked = evaluate_checkpoint(str(tmp_path / "run"), [str(corpus)], loss_mask=[str(mask_path)])
    everything = evaluate_checkpoint(str(tmp_path / "run"), [str(corpus)])
    assert ckpt.training["val_full_split"]
    assert ckpt.training["val_loss"] == pytest.approx(marked["loss"], rel=1e-4)
    val_chars = len(text) - int(len(text) * 0.9)
    # half the characters are marked; windows cover all but a split's last partial one
    assert 0.9 * everything["tokens"] / 2 < marked["tokens"] <= everything["tokens"] / 2 + 1
    assert marked["tokens"] <= int(np.frombuffer(mask, np.uint8)[-val_chars + 1 :].sum())
    # the copies and line ends are learnable; the random letters (ln 26 = 3.26) are not
    assert marked["loss"] < everything["loss"] - 0.3


def test_lm_eval_and_lm_train_take_the_mask_flag(masked_corpus, tmp_path, capsys):
    corpus, mask_path, *_ = masked_corpus
    out = tmp_path / "cli"
    args = ["train", "--corpus", str(corpus), "--loss-mask", str(mask_path), "--out", str(out)]
    args += ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16"]
    args += ["--max-steps", "4", "--eval-interval", "2", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    args = ["eval", "--checkpoint", str(out), "--corpus", str(corpus), "--json"]
    assert main([*args, "--loss-mask", str(mask_path)]) == 0
    marked = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    everything = json.loads(capsys.readouterr().out)
    assert marked["tokens"] < everything["tokens"] / 2 + 10


def test_a_recipes_mask_is_relative_to_the_recipe(masked_corpus, tmp_path, capsys):
    corpus, mask_path, *_ = masked_corpus
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'corpus = ["copy.txt"]\nloss_mask = "copy.mask"\nout = "run"\nn_layer = 1\n'
        "n_embd = 16\nn_head = 2\nblock_size = 16\nmax_steps = 2\neval_interval = 2\n"
        'device = "cpu"\n'
    )
    assert main(["train", "--config", str(recipe), "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "run").training["settings"]["loss_mask"] == ["copy.mask"]


# -- bad masks are clear errors ------------------------------------------------------------


def test_bad_masks_are_clear_errors(masked_corpus, tmp_path):
    corpus, mask_path, text, mask = masked_corpus
    bad = tmp_path / "bad.mask"
    cases = {
        "one byte (0 or 1) per character": mask[:-3],
        "bytes must be 0 or 1": mask[:-1] + b"\2",
        "marks no character of the validation split": mask[: len(mask) * 9 // 10]
        + bytes(len(mask) - len(mask) * 9 // 10),
    }
    for message, data in cases.items():
        bad.write_bytes(data)
        with pytest.raises(LMError, match=re.escape(message)):
            Trainer(config(corpus, bad, tmp_path / "x"), progress=False)
    with pytest.raises(LMError, match="no such file"):
        Trainer(config(corpus, tmp_path / "none.mask", tmp_path / "x"), progress=False)
    with pytest.raises(LMError, match="needs the char tokenizer"):
        Trainer(config(corpus, mask_path, tmp_path / "x", tokenizer="word"), progress=False)
    with pytest.raises(LMError, match="1 loss mask file"):
        read_loss_mask([mask_path], [corpus, corpus])
    assert not (tmp_path / "x").exists()


def test_masks_of_several_corpus_files_join_as_the_texts_do(masked_corpus):
    corpus, mask_path, text, mask = masked_corpus
    joined = read_loss_mask([mask_path, mask_path], [corpus, corpus])
    assert joined.tobytes() == mask + b"\0" + mask


def test_unmasked_evaluation_is_unchanged(masked_corpus):
    """No mask: every target counts, as before the mask existed."""
    from lm.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="gpt", vocab_size=30, n_layer=1, n_embd=16, n_head=2))
    ids = torch.randint(0, 30, (300,))
    everything = evaluate(model, ids, 300)
    ones = evaluate(model, ids, 300, mask=np.ones(300, np.uint8))
    assert everything == pytest.approx(ones)
