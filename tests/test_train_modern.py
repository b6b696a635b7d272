"""Training options of the modern GPT recipe: Muon (with exact resume), warm-down, the
wall-clock budget, bfloat16 autocast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_train_config
from torch.testing import assert_close

from lm.checkpoint import load_checkpoint, load_train_state
from lm.errors import LMError
from lm.optim import Muon, orthogonalize
from lm.train import TrainConfig, Trainer, effective_step, lr_at


def tiny_config(corpus: Path, out: Path, **overrides) -> TrainConfig:
    return tiny_train_config(corpus, out, threads=1, **overrides)


MODERN = dict(
    position="rope",
    norm="rmsnorm",
    qk_norm=True,
    mlp="swiglu",
    tie_embeddings=False,
    zero_init_proj=True,
)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_muon_takes_the_block_matrices_and_adamw_the_rest(corpus_path, tmp_path):
    trainer = Trainer(
        tiny_config(corpus_path, tmp_path / "m", optimizer="muon", **MODERN), progress=False
    )
    adamw, muon = trainer.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    muon_names = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    adamw_names = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert muon_names == {
        n for n in names.values() if n.startswith("blocks.") and "norm" not in n and "ln_" not in n
    }
    assert {
        "wte.weight",
        "lm_head.weight",
        "ln_f.weight",
        "blocks.0.attn.q_norm.weight",
    } <= adamw_names
    assert not muon_names & adamw_names
    assert muon.param_groups[0]["lr"] == 0.02


def test_muon_run_learns_and_resumes_exactly(corpus_path, tmp_path):
    def config(out: str, **extra) -> TrainConfig:
        return tiny_config(
            corpus_path,
            tmp_path / out,
            optimizer="muon",
            schedule="warmdown",
            max_steps=20,
            eval_interval=5,
            dropout=0.1,
            **MODERN,
            **extra,
        )

    Trainer(config("a"), progress=False).train()
    Trainer(config("b"), progress=False).train(stop_at=10)
    assert len(load_train_state(tmp_path / "b" / "train_state.pt")["optimizers"]) == 2
    Trainer(config("b", resume=True), progress=False).train()
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    losses = [r["train_loss"] for r in a if "train_loss" in r]
    assert losses[-1] < losses[0]
    assert [r.get("train_loss", r.get("val_loss")) for r in a] == pytest.approx(
        [r.get("train_loss", r.get("val_loss")) for r in b], abs=1e-6
    )
    weights_a = load_checkpoint(tmp_path / "a").model.state_dict()
    weights_b = load_checkpoint(tmp_path / "b").model.state_dict()
    for name, tensor in weights_a.items():
        assert_close(weights_b[name], tensor, atol=1e-6, rtol=0)


def test_resume_with_another_optimizer_is_an_lm_error(corpus_path, tmp_path):
    Trainer(
        tiny_config(corpus_path, tmp_path / "a", max_steps=10, eval_interval=5), progress=False
    ).train(stop_at=5)
    with pytest.raises(LMError, match="optimizer"):
        Trainer(
            tiny_config(
                corpus_path,
                tmp_path / "a",
                max_steps=10,
                eval_interval=5,
                optimizer="muon",
                resume=True,
            ),
            progress=False,
        )


def test_warmdown_is_flat_then_a_line_to_zero():
    config = TrainConfig(
        lr=1e-3, warmup_steps=10, max_steps=100, schedule="warmdown", warmdown_frac=0.2
    )
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(10, config) == lr_at(80, config) == pytest.approx(1e-3)
    assert lr_at(90, config) == pytest.approx(5e-4)
    assert lr_at(100, config) == lr_at(150, config) == 0.0


def test_schedule_follows_the_larger_of_step_and_time_fractions():
    config = TrainConfig(max_steps=1000, max_time=60.0)
    assert effective_step(100, 30.0, config) == 500  # half the time, a tenth of the steps
    assert effective_step(700, 30.0, config) == 700
    assert effective_step(10, 120.0, config) == 1000
    assert effective_step(10, 120.0, TrainConfig(max_steps=1000)) == 10  # no budget
    warmdown = TrainConfig(
        lr=1.0,
        warmup_steps=10,
        max_steps=10**6,
        max_time=60.0,
        schedule="warmdown",
        warmdown_frac=0.5,
    )
    assert lr_at(4, warmdown, elapsed=59.0) == 0.5  # warm-up counts steps, even late
    assert lr_at(100, warmdown, elapsed=15.0) == 1.0
    assert lr_at(100, warmdown, elapsed=45.0) == pytest.approx(0.5)  # half-way down by time


def test_max_time_ends_the_run_and_resume_keeps_the_elapsed_time(corpus_path, tmp_path):
    config = tiny_config(
        corpus_path,
        tmp_path / "t",
        max_steps=100_000,
        eval_interval=1000,
        max_time=1.0,
        schedule="warmdown",
        warmdown_frac=1.0,
        warmup_steps=0,
    )
    summary = Trainer(config, progress=False).train()
    assert summary["finished"] and 1 <= summary["step"] < 100_000
    assert summary["train_seconds"] >= 1.0
    assert load_checkpoint(tmp_path / "t").training["val_full_split"]
    records = [r for r in read_metrics(tmp_path / "t") if "lr" in r]
    assert records[-1]["step"] == summary["step"]  # the last step is logged
    assert records[-1]["lr"] < config.lr  # the warm-down followed the clock, not the steps
    resumed = Trainer(TrainConfig(**{**vars(config), "resume": True}), progress=False)
    assert resumed.elapsed >= 1.0
    assert resumed.train()["step"] == summary["step"]  # budget spent: no more steps


def test_bfloat16_autocast_trains_float32_weights(corpus_path, tmp_path):
    trainer = Trainer(
        tiny_config(corpus_path, tmp_path / "b", dtype="bfloat16", max_steps=10, **MODERN),
        progress=False,
    )
    summary = trainer.train()
    assert summary["val_loss"] < 4.0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"optimizer": "sgd"}, "--optimizer"),
        ({"schedule": "step"}, "--schedule"),
        ({"dtype": "float16"}, "--dtype"),
        ({"max_time": 0}, "--max-time"),
        ({"warmdown_frac": 0}, "--warmdown-frac"),
        ({"optimizer": "muon", "model": "lstm"}, "GPT"),
    ],
)
def test_bad_training_options_are_lm_errors(settings, message, corpus_path, tmp_path):
    with pytest.raises(LMError, match=message):
        tiny_config(corpus_path, tmp_path / "x", **settings).validate()


def test_muon_equals_torch_muon_with_the_same_precision():
    torch.manual_seed(0)
    weights = [torch.randn(12, 4, requires_grad=True), torch.randn(4, 8, requires_grad=True)]
    copies = [w.detach().clone().requires_grad_() for w in weights]
    ours = Muon(weights, lr=0.05, weight_decay=0.1, ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon(copies, lr=0.05, weight_decay=0.1, adjust_lr_fn="original")
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, optimizer in ((weights, ours), (copies, theirs)):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    for mine, reference in zip(weights, copies):
        assert_close(mine, reference, atol=1e-6, rtol=0)


def test_orthogonalize_in_float32_pushes_singular_values_near_one():
    matrix = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    singular = torch.linalg.svdvals(orthogonalize(matrix, dtype=torch.float32))
    assert singular.min() > 0.5 and singular.max() < 1.5


def test_shipped_char_gpt_recipe_is_modern_with_a_long_context_and_an_hour(tmp_path):
    import tomllib

    recipe = Path(__file__).resolve().parent.parent / "checkpoints" / "shakespeare-char-gpt"
    settings = tomllib.loads((recipe / "recipe.toml").read_text())
    config = TrainConfig.from_dict(settings)
    config.validate()
    assert config.block_size >= 256 and config.max_time == 3600
    assert config.optimizer == "muon" and config.position == "rope"


def test_cli_flags_reach_the_model_and_optimizer(corpus_path, tmp_path):
    from lm.cli import main

    out = tmp_path / "cli"
    assert (
        main(
            [
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
                "--threads",
                "1",
                "--position",
                "rope",
                "--norm",
                "rmsnorm",
                "--qk-norm",
                "--mlp",
                "relu2",
                "--no-tie-embeddings",
                "--zero-init-proj",
                "--logit-softcap",
                "20",
                "--optimizer",
                "muon",
                "--muon-lr",
                "0.01",
                "--schedule",
                "warmdown",
                "--warmdown-frac",
                "0.5",
                "--max-time",
                "600",
                "--dtype",
                "float32",
                "--no-progress",
            ]
        )
        == 0
    )
    model = json.loads((out / "config.json").read_text())["model"]
    assert (
        model["position"],
        model["norm"],
        model["qk_norm"],
        model["mlp"],
        model["tie_embeddings"],
        model["zero_init_proj"],
        model["logit_softcap"],
    ) == ("rope", "rmsnorm", True, "relu2", False, True, 20.0)
    settings = load_checkpoint(out).training["settings"]
    assert (settings["optimizer"], settings["muon_lr"], settings["max_time"]) == ("muon", 0.01, 600)
