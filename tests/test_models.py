"""Models: `step` agrees with `forward`, batched states agree with single rows, bad configs."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lm.errors import LMError
from lm.models import KINDS, MODELS, ModelConfig, build_model, model_builder

VOCAB = 23
ATOL = 1e-5


def tiny_model(kind: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = dict(kind=kind, vocab_size=VOCAB, n_layer=2, n_embd=16, n_head=2, block_size=16)
    settings.update(overrides)
    model = build_model(ModelConfig(**settings)).eval()
    # Random (not the near-zero initial) weights, so that small mistakes show in the logits.
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def ids_of(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def stack(states: list[dict]) -> dict:
    return {key: torch.cat([s[key] for s in states]) for key in states[0]}


@pytest.mark.parametrize("kind", KINDS)
def test_forward_shape_and_num_params(kind):
    model = tiny_model(kind)
    assert model(ids_of(3, 7)).shape == (3, 7, VOCAB)
    assert 0 < model.num_params() <= sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_step_one_token_at_a_time_equals_forward(kind):
    model = tiny_model(kind)
    ids = ids_of(2, 12)
    expected = model(ids)
    state = model.init_state(2)
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t : t + 1], state)
        assert_close(logits, expected[:, t], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_prefill_then_steps_equals_forward(kind):
    model = tiny_model(kind)
    ids = ids_of(2, 12)
    expected = model(ids)
    logits, state = model.step(ids[:, :5], model.init_state(2))
    assert_close(logits, expected[:, 4], atol=ATOL, rtol=0)
    logits, state = model.step(ids[:, 5:8], state)  # a second chunk of several tokens
    assert_close(logits, expected[:, 7], atol=ATOL, rtol=0)
    for t in range(8, ids.shape[1]):
        logits, state = model.step(ids[:, t : t + 1], state)
        assert_close(logits, expected[:, t], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_batched_rows_at_different_positions_equal_single_rows(kind):
    model = tiny_model(kind)
    prompts = [ids_of(1, 3, seed=2), ids_of(1, 9, seed=3)]
    states, single = [], []
    for prompt in prompts:
        _, state = model.step(prompt, model.init_state(1))
        states.append(state)
    batched_state = stack(states)
    if kind == "gpt":
        assert batched_state["pos"].tolist() == [3, 9]
    for t in range(4):
        next_ids = ids_of(2, 1, seed=10 + t)
        batched_logits, batched_state = model.step(next_ids, batched_state)
        single = []
        for row in range(2):
            logits, states[row] = model.step(next_ids[row : row + 1], states[row])
            single.append(logits)
        assert_close(batched_logits, torch.cat(single), atol=ATOL, rtol=0)
        # ... and each row still agrees with `forward` over its whole history.
        prompts = [torch.cat([p, next_ids[row : row + 1]], dim=1) for row, p in enumerate(prompts)]
        for row, prompt in enumerate(prompts):
            assert_close(batched_logits[row], model(prompt)[0, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_a_row_split_from_a_batch_continues_alone(kind):
    model = tiny_model(kind)
    ids = ids_of(3, 6)
    _, state = model.step(ids, model.init_state(3))
    row_state = {key: value[1:2].clone() for key, value in state.items()}
    next_id = ids_of(1, 1, seed=5)
    logits, _ = model.step(next_id, row_state)
    assert_close(logits[0], model(torch.cat([ids[1:2], next_id], dim=1))[0, -1], atol=ATOL, rtol=0)


@torch.no_grad()
@torch.no_grad()
def test_long_gpt_prefill_uses_bfloat16_products_and_stays_close(monkeypatch):
    """Prefills of BF16_PREFILL_BLOCK tokens or more multiply in bfloat16 on CPUs that do it
    in hardware (padded to a multiple of the block): the logits stay close to float32's."""
    import lm.models.gpt as gpt

    model = tiny_model("gpt", block_size=400, n_embd=32, n_head=4)
    for param in model.parameters():
        param.mul_(0.3)  # keep activations in the range of a trained model's
    ids = ids_of(2, 300)  # 600 tokens: one block and a padded part
    monkeypatch.setattr(gpt, "bf16_matmul_is_fast", lambda: True)
    calls = []
    monkeypatch.setattr(
        gpt.F,
        "linear",
        lambda x, w, b=None: calls.append((x.dtype, x.shape)) or torch._C._nn.linear(x, w, b),
    )
    logits, state = model.step(ids, model.init_state(2))
    assert (torch.bfloat16, (1024, 32)) in calls  # 600 rows padded to 1024
    expected = model(ids)[:, -1]
    assert_close(logits, expected, atol=0.05, rtol=0.05)
    assert not torch.equal(logits, expected)  # it did run in bfloat16
    calls.clear()
    # Decode steps: float32 (small batches run in the native whole-model step, which makes
    # no F.linear calls to observe: the PyTorch path is checked here).
    monkeypatch.setattr(gpt, "decode_attention", lambda: None)
    logits, state = model.step(ids_of(2, 1, seed=7), state)
    assert calls and all(dtype == torch.float32 for dtype, _ in calls)
    calls.clear()
    model.step(ids_of(600, 1), model.init_state(600))  # even with 600 rows
    assert calls and all(dtype == torch.float32 for dtype, _ in calls)

    monkeypatch.setattr(gpt, "bf16_matmul_is_fast", lambda: False)
    calls.clear()
    assert_close(model.step(ids, model.init_state(2))[0], expected, atol=ATOL, rtol=0)
    assert all(dtype == torch.float32 for dtype, _ in calls)


def test_bf16_prefill_follows_the_cpu_and_lm_bf16_prefill(monkeypatch):
    from lm import native

    native.bf16_matmul_is_fast.cache_clear()
    monkeypatch.setattr(native, "_cpu_signature", lambda: "flags : fpu sse2 avx2 fma")
    assert not native.bf16_matmul_is_fast()
    native.bf16_matmul_is_fast.cache_clear()
    monkeypatch.setattr(native, "_cpu_signature", lambda: "flags : avx2 avx512f avx512_bf16")
    assert native.bf16_matmul_is_fast()
    native.bf16_matmul_is_fast.cache_clear()
    monkeypatch.setenv("LM_BF16_PREFILL", "0")
    assert not native.bf16_matmul_is_fast()
    native.bf16_matmul_is_fast.cache_clear()


def test_gpt_refuses_more_than_its_context():
    model = tiny_model("gpt", block_size=8)
    assert model.context_size == 8
    _, state = model.step(ids_of(1, 8), model.init_state(1))
    with pytest.raises(ValueError, match="block size"):
        model.step(ids_of(1, 1), state)
    with pytest.raises(ValueError, match="block size"):
        model(ids_of(1, 9))


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@torch.no_grad()
def test_recurrent_models_have_no_context_limit(kind):
    model = tiny_model(kind, block_size=4)
    assert model.context_size is None
    logits, _ = model.step(ids_of(1, 40), model.init_state(1))
    assert torch.isfinite(logits).all()


def test_gpt_weights_are_tied():
    model = tiny_model("gpt")
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(kind="gpt", n_embd=30, n_head=4), "divisible"),
        (dict(kind="transformer"), "unknown model"),
        (dict(kind="lstm", n_layer=0), "--n-layer"),
        (dict(kind="gpt", dropout=1.0), "--dropout"),
    ],
)
def test_bad_config_is_an_lm_error(settings, message):
    with pytest.raises(LMError, match=message):
        ModelConfig(**settings)


def test_n_head_is_ignored_by_recurrent_models():
    assert ModelConfig(kind="lstm", n_embd=30, n_head=4).n_embd == 30


def test_config_dict_round_trip_ignores_unknown_keys():
    config = ModelConfig(kind="gru", vocab_size=50, n_layer=1, n_embd=8)
    assert ModelConfig.from_dict({**config.to_dict(), "extra": 1}) == config


def test_registry_builds_every_kind_and_refuses_the_rest():
    assert KINDS == tuple(MODELS) == ("rnn", "gru", "lstm", "gpt")
    for kind in KINDS:
        model = model_builder(kind)(
            ModelConfig(kind=kind, vocab_size=11, n_layer=1, n_embd=8, n_head=2, block_size=8)
        )
        assert model.config.kind == kind
    for kind in ("transformer", "", None, "GPT"):
        with pytest.raises(
            LMError, match=f"unknown model {kind!r}; choose one of rnn, gru, lstm, gpt"
        ):
            model_builder(kind)
