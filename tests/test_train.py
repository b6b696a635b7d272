"""Training: a tiny run learns and writes its checkpoint, resume is exact, lr schedule, evaluation."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_train_config as tiny_config
from torch.testing import assert_close

from lm.checkpoint import load_checkpoint
from lm.errors import LMError
from lm.evaluate import evaluate
from lm.models import ModelConfig, build_model
from lm.train import TrainConfig, Trainer, lr_at

ARTEFACTS = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "metrics.jsonl",
    "loss.png",
    "train_state.pt",
)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def by_step(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


@pytest.fixture(scope="module", params=["gpt", "lstm"])
def trained(request, tmp_path_factory, corpus_text) -> tuple[TrainConfig, dict]:
    root = tmp_path_factory.mktemp(f"train-{request.param}")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text, encoding="utf-8")
    config = tiny_config(corpus, root / "run", request.param)
    trainer = Trainer(config, progress=False)
    initial = evaluate(trainer.model, trainer.val_ids, trainer.val_chars)
    summary = trainer.train()
    return config, summary, initial


def test_training_lowers_the_loss(trained):
    config, summary, initial = trained
    vocab_size = load_checkpoint(config.out).config.vocab_size
    assert initial["loss"] == pytest.approx(math.log(vocab_size), abs=0.1)  # uniform guessing
    records = read_metrics(Path(config.out))
    train_loss = by_step(records, "train_loss")
    val_loss = by_step(records, "val_loss")
    assert sorted(train_loss) == [10, 20, 30] and sorted(val_loss) == [10, 20, 30]
    assert max(train_loss.values()) < initial["loss"] - 0.4
    assert max(val_loss.values()) < initial["loss"] - 0.4
    assert summary["val_loss"] == min(val_loss.values())  # the best checkpoint is kept


def test_training_writes_a_loadable_checkpoint(trained, corpus_text):
    config, summary, _ = trained
    out = Path(config.out)
    for name in ARTEFACTS:
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(ARTEFACTS)  # no temporary leftovers
    ckpt = load_checkpoint(out)
    assert ckpt.config.kind == config.model and ckpt.tokenizer.kind == "char"
    assert not ckpt.model.training
    assert ckpt.training["finished"] is True
    assert ckpt.training["val_loss"] == pytest.approx(summary["val_loss"])
    assert ckpt.training["val_bpc"] == pytest.approx(summary["val_loss"] / math.log(2))
    assert ckpt.training["settings"]["max_steps"] == 30
    ids = torch.tensor([ckpt.tokenizer.encode("The king")])
    assert ckpt.model(ids).shape == (1, 8, ckpt.tokenizer.vocab_size)


def test_resume_refuses_a_different_model(trained):
    config, _, _ = trained
    changed = TrainConfig(**{**vars(config), "n_embd": 16, "resume": True})
    with pytest.raises(LMError, match="different model config"):
        Trainer(changed, progress=False)


def test_new_run_refuses_an_existing_checkpoint(trained):
    config, _, _ = trained
    with pytest.raises(LMError, match="already holds a checkpoint"):
        Trainer(TrainConfig(**vars(config)), progress=False)


def test_resume_without_train_state_is_an_lm_error(corpus_path, tmp_path):
    with pytest.raises(LMError, match="nothing to resume"):
        Trainer(tiny_config(corpus_path, tmp_path / "new", "gpt", resume=True), progress=False)


@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_interrupted_and_resumed_run_equals_uninterrupted_run(model, corpus_path, tmp_path):
    def config(out: str, **extra) -> TrainConfig:
        return tiny_config(
            corpus_path, tmp_path / out, model, max_steps=20, eval_interval=5, dropout=0.1, **extra
        )

    Trainer(config("a"), progress=False).train()

    partial = Trainer(config("b"), progress=False).train(stop_at=10)
    assert partial["step"] == 10
    assert Trainer(config("b", resume=True), progress=False).step == 10
    Trainer(config("b", resume=True), progress=False).train()

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for key in ("train_loss", "val_loss"):
        steps = by_step(a, key)
        assert sorted(steps) == sorted(by_step(b, key))  # no duplicate or missing record
        for step, loss in steps.items():
            assert by_step(b, key)[step] == pytest.approx(loss, abs=1e-6), (key, step)
    assert sorted(by_step(a, "val_loss")) == [5, 10, 15, 20]
    weights_a = load_checkpoint(tmp_path / "a").model.state_dict()
    weights_b = load_checkpoint(tmp_path / "b").model.state_dict()
    for name, tensor in weights_a.items():
        assert_close(weights_b[name], tensor, atol=1e-6, rtol=0)


# -- learning-rate schedule ---------------------------------------------------------------


def test_lr_warms_up_linearly_then_decays_to_min_lr():
    config = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(4, config) == pytest.approx(5e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(10, config) == pytest.approx(1e-3)
    assert lr_at(60, config) == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint
    assert lr_at(110, config) == pytest.approx(1e-4)
    assert lr_at(500, config) == pytest.approx(1e-4)  # stays at the floor after max_steps
    after_warmup = [lr_at(step, config) for step in range(10, 111)]
    assert all(x >= y for x, y in pairwise(after_warmup))


def test_lr_defaults_min_lr_to_a_tenth_and_allows_no_warmup():
    config = TrainConfig(lr=2e-3, warmup_steps=0, max_steps=50)
    assert lr_at(0, config) == pytest.approx(2e-3)
    assert lr_at(50, config) == pytest.approx(2e-4)


# -- evaluation ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
@pytest.mark.parametrize("chars_per_token", [1, 3])
def test_evaluate_metrics_are_consistent(kind, chars_per_token):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(kind=kind, vocab_size=30, n_layer=1, n_embd=16, n_head=2, block_size=8)
    )
    ids = torch.randint(0, 30, (101,), generator=torch.Generator().manual_seed(0))
    result = evaluate(model, ids, n_chars=chars_per_token * len(ids))
    assert set(result) == {"loss", "perplexity", "bpc", "tokens"}
    assert 0 < result["tokens"] <= len(ids) - 1
    assert result["loss"] == pytest.approx(math.log(30), rel=0.05)  # untrained: near uniform
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bpc"] == pytest.approx(result["loss"] / math.log(2) / chars_per_token)
    assert model.training  # evaluation leaves the model's mode as it found it


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_evaluate_is_deterministic_and_respects_max_tokens(kind):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            kind=kind, vocab_size=30, n_layer=1, n_embd=16, n_head=2, block_size=8, dropout=0.5
        )
    )
    ids = torch.randint(0, 30, (300,), generator=torch.Generator().manual_seed(0))
    assert evaluate(model, ids, len(ids)) == evaluate(model, ids, len(ids))  # dropout is off
    capped = evaluate(model, ids, len(ids), max_tokens=40)
    assert 0 < capped["tokens"] <= 40
    assert capped["bpc"] == pytest.approx(capped["loss"] / math.log(2))
