"""Checkpoints: save/load round trips, clear errors for damaged directories, no pickle."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest
import torch

from lm.checkpoint import (
    TRAIN_STATE_FILE,
    atomic_torch_save,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
)
from lm.errors import LMError
from lm.models import ModelConfig, build_model
from lm.tokenizers import train_tokenizer
from lm.train import TrainConfig, Trainer


def save_tiny(directory: Path, kind: str, tokenizer_kind: str, text: str) -> torch.nn.Module:
    tokenizer = train_tokenizer(tokenizer_kind, text, vocab_size=400)
    torch.manual_seed(0)
    config = ModelConfig(
        kind=kind, vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=16, n_head=2, block_size=16
    )
    model = build_model(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    save_checkpoint(directory, model, tokenizer, training={"step": 3, "val_loss": 1.5})
    return model


@pytest.mark.parametrize(
    ("kind", "tokenizer_kind"), [("gpt", "char"), ("lstm", "word"), ("gru", "bpe"), ("rnn", "spm")]
)
def test_save_load_round_trip_gives_identical_logits(kind, tokenizer_kind, corpus_text, tmp_path):
    model = save_tiny(tmp_path, kind, tokenizer_kind, corpus_text)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.config == model.config
    assert ckpt.tokenizer.kind == tokenizer_kind
    assert ckpt.training == {"step": 3, "val_loss": 1.5}
    assert not ckpt.model.training
    ids = torch.tensor([ckpt.tokenizer.encode("The king walks toward the sea.")[:16]])
    with torch.no_grad():
        assert torch.equal(ckpt.model(ids), model(ids))
    assert ckpt.model.lm_head.weight is ckpt.model.wte.weight  # tying survives the round trip
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_saving_again_replaces_the_checkpoint(corpus_text, tmp_path):
    save_tiny(tmp_path, "gpt", "char", corpus_text)
    model = save_tiny(tmp_path, "lstm", "char", corpus_text)
    assert load_checkpoint(tmp_path).config == model.config


def test_load_by_a_name_that_is_neither_directory_nor_shipped(tmp_path):
    with pytest.raises(LMError, match="no checkpoint 'no-such-model'"):
        load_checkpoint("no-such-model")


@pytest.fixture
def saved(corpus_text, tmp_path) -> Path:
    directory = tmp_path / "ckpt"
    save_tiny(directory, "gpt", "char", corpus_text)
    return directory


def _edit_config(directory: Path, **model_changes) -> None:
    path = directory / "config.json"
    meta = json.loads(path.read_text())
    meta["model"].update(model_changes)
    path.write_text(json.dumps(meta))


DAMAGES = {
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
    "truncated weights": (
        lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:500]
        ),
        "model.safetensors: damaged",
    ),
    "wrong shapes": (lambda d: _edit_config(d, n_embd=32), "does not match config.json"),
    "bad model field": (lambda d: _edit_config(d, n_layer=0), "config.json: bad model config"),
    "missing config": (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    "config not json": (lambda d: (d / "config.json").write_text("{oops"), "config.json: damaged"),
    "missing tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
    "foreign config": (
        lambda d: (d / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}'),
        "not an lm checkpoint",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_damaged_checkpoint_is_an_lm_error_naming_the_file(damage, saved):
    apply, message = DAMAGES[damage]
    apply(saved)
    with pytest.raises(LMError, match=message):
        load_checkpoint(saved)


def _edit_tokenizer_kind(directory: Path, kind: str) -> None:
    path = directory / "config.json"
    meta = json.loads(path.read_text())
    meta["tokenizer"]["kind"] = kind
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: _edit_config(d, kind="transformer"),
            "unknown model 'transformer'; choose one of rnn, gru, lstm, gpt",
        ),
        (
            lambda d: _edit_tokenizer_kind(d, "morse"),
            "unknown tokenizer 'morse'; choose one of char, word, bpe, spm",
        ),
    ],
    ids=["model", "tokenizer"],
)
def test_unknown_kind_in_config_is_an_error_not_a_fallback(edit, message, saved):
    edit(saved)
    with pytest.raises(LMError, match=message):
        load_checkpoint(saved)


# -- train_state.pt: no code runs on load --------------------------------------------------


class _Payload:
    """Pickles into a call that creates `marker` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_train_state_round_trip(tmp_path):
    state = {
        "step": 7,
        "generator": torch.Generator().manual_seed(3).get_state(),
        "model": {"w": torch.arange(4.0)},
        "model_config": "{}",
        "best_val": 1.25,
    }
    atomic_torch_save(state, tmp_path / TRAIN_STATE_FILE)
    loaded = load_train_state(tmp_path / TRAIN_STATE_FILE)
    assert loaded["step"] == 7 and loaded["best_val"] == 1.25
    assert torch.equal(loaded["generator"], state["generator"])
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_pickle_payload_in_train_state_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / TRAIN_STATE_FILE
    torch.save({"step": 1, "payload": _Payload(marker)}, path)
    with pytest.raises(LMError, match=TRAIN_STATE_FILE):
        load_train_state(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # control: the payload is real and would run
    assert marker.exists()


def test_resume_refuses_a_pickle_payload(corpus_path, tmp_path):
    out = tmp_path / "run"
    settings = dict(
        corpus=[str(corpus_path)],
        out=str(out),
        n_layer=1,
        n_embd=16,
        n_head=2,
        block_size=16,
        batch_size=4,
        max_steps=10,
        eval_interval=5,
        device="cpu",
    )
    Trainer(TrainConfig(**settings), progress=False).train(stop_at=5)
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": _Payload(marker)}, out / TRAIN_STATE_FILE)
    with pytest.raises(LMError, match=f"{TRAIN_STATE_FILE}: cannot be read safely"):
        Trainer(TrainConfig(**settings, resume=True), progress=False)
    assert not marker.exists()


# -- validation of the weights against config.json ----------------------------------------


def _edit_weights(directory: Path, edit) -> None:
    """Rewrite model.safetensors with `edit(tensors)` applied (a real file, as a tool would)."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _poison(name: str, value: float):
    def edit(tensors):
        tensors[name].view(-1)[5] = value

    return edit


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_weight_is_refused_naming_file_and_tensor(saved, value):
    _edit_weights(saved, _poison("blocks.0.mlp.c_fc.weight", value))
    with pytest.raises(LMError) as info:
        load_checkpoint(saved)
    message = str(info.value)
    assert message.startswith(str(saved / "model.safetensors"))
    assert "'blocks.0.mlp.c_fc.weight' holds 1 non-finite value" in message
    assert f"({value} at [0, 5])" in message
    assert "\n" not in message


def test_every_non_finite_value_is_counted(saved):
    _edit_weights(saved, lambda t: t["lm_head.weight"].fill_(float("nan")))
    with pytest.raises(LMError, match=r"'lm_head.weight' holds \d{3,} non-finite values"):
        load_checkpoint(saved)


WEIGHT_DAMAGES = {
    "extra tensor": (
        lambda t: t.update(extra=torch.zeros(3)),
        "does not match config.json: unexpected tensor 'extra'",
    ),
    "missing tensor": (
        lambda t: t.pop("blocks.1.ln_2.weight"),
        "does not match config.json: missing tensor 'blocks.1.ln_2.weight'",
    ),
    "missing tied tensor": (
        lambda t: t.pop("lm_head.weight"),  # tied to wte.weight: one copy
        r"missing tensor '(lm_head|wte)\.weight'",
    ),
    "one shape wrong": (
        lambda t: t.update({"blocks.0.attn.c_proj.weight": torch.zeros(16, 15)}),
        r"tensor 'blocks.0.attn.c_proj.weight' has shape \[16, 15\], the model built from "
        r"config.json has \[16, 16\]",
    ),
    "integer weights": (
        lambda t: t.update({"blocks.0.ln_1.weight": torch.ones(16, dtype=torch.int32)}),
        "tensor 'blocks.0.ln_1.weight' has dtype int32, expected float32",
    ),
}


@pytest.mark.parametrize("damage", WEIGHT_DAMAGES, ids=list(WEIGHT_DAMAGES))
def test_weights_that_do_not_fit_the_config_are_refused(saved, damage):
    edit, message = WEIGHT_DAMAGES[damage]
    _edit_weights(saved, edit)
    with pytest.raises(LMError, match=message):
        load_checkpoint(saved)


def test_half_precision_weights_are_accepted_and_cast(saved):
    before = load_checkpoint(saved).model.state_dict()
    _edit_weights(saved, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    after = load_checkpoint(saved).model.state_dict()
    for name, tensor in after.items():
        assert tensor.dtype == torch.float32
        assert torch.allclose(tensor, before[name], rtol=1e-2, atol=1e-2)
