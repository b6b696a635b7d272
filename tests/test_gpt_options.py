"""Modern GPT blocks: each option alone and all together keep `step` equal to `forward`
(PyTorch path and native decode kernel, rows at different positions), and old configs load
as the classic block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lm import native
from lm.errors import LMError
from lm.models import ModelConfig, build_model
from lm.models.gpt import apply_rotary, rotary_tables

VOCAB = 23
ATOL = 1e-5
MODERN = dict(
    position="rope",
    norm="rmsnorm",
    qk_norm=True,
    mlp="swiglu",
    tie_embeddings=False,
    zero_init_proj=True,
    logit_softcap=15.0,
)
OPTIONS = [
    {},
    *({key: value} for key, value in MODERN.items()),
    {"mlp": "relu2"},
    {"position": "rope", "rope_theta": 100.0},
    MODERN,
    {**MODERN, "mlp": "relu2", "bias": True},
]
SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints"


def tiny_gpt(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        kind="gpt", vocab_size=VOCAB, n_layer=2, n_embd=16, n_head=2, block_size=16, **options
    )
    model = build_model(config).eval()
    with torch.no_grad():  # random weights (zero-initialised ones would hide mistakes)
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def ids_of(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["torch", "native"])
def decode_path(request, monkeypatch):
    """Decode steps through the PyTorch path (LM_NATIVE=0) or the compiled kernel."""
    monkeypatch.setenv("LM_NATIVE", "0" if request.param == "torch" else "1")
    native.decode_attention.cache_clear()
    if request.param == "native" and native.decode_attention() is None:
        pytest.skip("no C compiler: the native kernel cannot be built")
    yield request.param
    native.decode_attention.cache_clear()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "classic")
@torch.no_grad()
def test_step_equals_forward_for_rows_at_different_positions(options, decode_path):
    model = tiny_gpt(**options)
    prompts = [ids_of(1, 3, seed=2), ids_of(1, 9, seed=3), ids_of(1, 1, seed=4)]
    states = [model.step(p, model.init_state(1))[1] for p in prompts]
    state = {key: torch.cat([s[key] for s in states]) for key in states[0]}
    for t in range(6):
        next_ids = ids_of(3, 1, seed=10 + t)
        logits, state = model.step(next_ids, state)
        prompts = [torch.cat([p, next_ids[row : row + 1]], dim=1) for row, p in enumerate(prompts)]
        for row, prompt in enumerate(prompts):
            assert_close(logits[row], model(prompt)[0, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "classic")
@torch.no_grad()
def test_prefill_chunks_then_steps_equal_forward(options, decode_path):
    model = tiny_gpt(**options)
    ids = ids_of(2, 12)
    expected = model(ids)
    logits, state = model.step(ids[:, :5], model.init_state(2))
    assert_close(logits, expected[:, 4], atol=ATOL, rtol=0)
    logits, state = model.step(ids[:, 5:8], state)
    assert_close(logits, expected[:, 7], atol=ATOL, rtol=0)
    for t in range(8, 12):
        logits, state = model.step(ids[:, t : t + 1], state)
        assert_close(logits, expected[:, t], atol=ATOL, rtol=0)


def test_rotary_matches_the_rotate_half_formula_and_keeps_norms():
    head_dim, theta = 8, 10000.0
    x = torch.randn(1, 5, 2, head_dim)
    positions = torch.arange(5)
    rotated = apply_rotary(x, rotary_tables(positions, head_dim, theta))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angle = positions[:, None].float() * inv_freq  # [T, D/2]: pairs (i, i + D/2) rotate
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    expected = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    assert_close(rotated, expected)
    assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    assert_close(rotated[:, 0], x[:, 0])  # position 0 is not rotated


def test_modern_model_has_no_position_table_and_an_untied_head():
    model = tiny_gpt(**MODERN)
    names = set(dict(model.named_parameters()))
    assert model.wpe is None and "wpe.weight" not in names
    assert model.lm_head.weight is not model.wte.weight
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"} <= names
    assert not any(name.endswith(".bias") for name in names)
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_zero_init_proj_starts_each_block_as_the_identity():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, n_layer=2, n_embd=16, n_head=2, block_size=16, zero_init_proj=True
    )
    model = build_model(config)
    for block in model.blocks:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    assert model.blocks[0].mlp.c_fc.weight.any()


def test_swiglu_matches_a_four_times_mlp_in_parameters():
    gelu = build_model(ModelConfig(n_embd=192, n_head=6, n_layer=1))
    swiglu = build_model(ModelConfig(n_embd=192, n_head=6, n_layer=1, mlp="swiglu"))
    assert swiglu.blocks[0].mlp.c_fc.weight.shape == (2 * 512, 192)
    assert swiglu.num_params() == gelu.num_params()


@torch.no_grad()
def test_logit_softcap_bounds_the_logits():
    logits = tiny_gpt(logit_softcap=2.0)(ids_of(2, 7))
    assert logits.abs().max() < 2.0


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"position": "alibi"}, "--position"),
        ({"norm": "batch"}, "--norm"),
        ({"mlp": "geglu"}, "--mlp"),
        ({"position": "rope", "n_embd": 18, "n_head": 2}, "even"),
        ({"logit_softcap": -1.0}, "softcap"),
    ],
)
def test_bad_options_are_lm_errors(settings, message):
    with pytest.raises(LMError, match=message):
        ModelConfig(**settings)


CLASSIC_SHIPPED = [  # shipped GPTs trained before the block options: their configs lack them
    path.name
    for path in sorted(SHIPPED.iterdir())
    if (path / "config.json").is_file()
    and json.loads((path / "config.json").read_text())["model"]["kind"] == "gpt"
    and "position" not in json.loads((path / "config.json").read_text())["model"]
]


def test_the_shipped_char_gpt_has_qwen3_blocks():
    saved = json.loads((SHIPPED / "shakespeare-char-gpt" / "config.json").read_text())["model"]
    config = ModelConfig.from_dict(saved)
    assert (config.position, config.norm, config.mlp, config.qk_norm) == (
        "rope",
        "rmsnorm",
        "swiglu",
        True,
    )
    assert not config.tie_embeddings and not config.bias and config.block_size >= 256


@pytest.mark.parametrize("name", CLASSIC_SHIPPED)
def test_shipped_configs_without_the_new_keys_are_the_classic_block(name):
    saved = json.loads((SHIPPED / name / "config.json").read_text())["model"]
    assert "position" not in saved
    config = ModelConfig.from_dict(saved)
    assert (
        config.position,
        config.norm,
        config.mlp,
        config.tie_embeddings,
        config.qk_norm,
        config.logit_softcap,
    ) == ("learned", "layernorm", "gelu", True, False, 0.0)
    from lm.checkpoint import load_checkpoint

    model = load_checkpoint(SHIPPED / name).model
    assert model.wpe is not None and model.lm_head.weight is model.wte.weight
