"""Sampling: pure tensor tests of `sample` and `token_logprobs` (no model)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lm.errors import LMError
from lm.sampling import (
    MAX_STOP_SEQUENCES,
    Limits,
    SamplingBatch,
    SamplingParams,
    SamplingSlots,
    process,
    sample,
    token_logprobs,
)

V = 12


def batch(rows: int, temperature=1.0, top_k=0, top_p=1.0, uniform=0.5, min_p=0.0) -> SamplingBatch:
    """Per-row parameters; each argument is a scalar (the same for every row) or a list."""

    def column(value, dtype):
        values = value if isinstance(value, (list, tuple)) else [value] * rows
        return torch.tensor(values, dtype=dtype)

    return SamplingBatch(
        temperature=column(temperature, torch.float32),
        top_k=column(top_k, torch.long),
        top_p=column(top_p, torch.float32),
        uniform=column(uniform, torch.float64),
        min_p=column(min_p, torch.float32),
    )


def random_logits(rows: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * scale


def grid(n: int) -> list[float]:
    """`n` evenly spread uniforms in (0, 1): empirical frequencies with no sampling noise."""
    return [(i + 0.5) / n for i in range(n)]


def frequencies(logits_row: torch.Tensor, n: int = 4000, **params) -> torch.Tensor:
    """How often each token is drawn over a grid of uniforms, everything else fixed."""
    tokens = sample(logits_row.expand(n, -1), batch(n, uniform=grid(n), **params))
    return torch.bincount(tokens, minlength=logits_row.shape[-1]).double() / n


def test_temperature_zero_is_argmax_whatever_the_uniform():
    logits = random_logits(6)
    for u in (0.0, 0.3, 0.999999):
        tokens = sample(logits, batch(6, temperature=0.0, top_k=3, top_p=0.5, uniform=u))
        assert tokens.tolist() == logits.argmax(dim=-1).tolist()


def test_top_k_one_is_argmax_whatever_the_uniform():
    logits = random_logits(5, seed=1)
    for u in grid(50):
        tokens = sample(logits, batch(5, temperature=1.5, top_k=1, uniform=u))
        assert tokens.tolist() == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("k", [2, 3, 5])
def test_top_k_never_picks_outside_the_k_largest(k):
    logits = random_logits(4, seed=2, scale=0.5)  # flat-ish: the tail has real mass
    allowed = logits.topk(k, dim=-1).indices
    n = 500
    for row in range(4):
        tokens = sample(
            logits[row].expand(n, -1), batch(n, temperature=2.0, top_k=k, uniform=grid(n))
        )
        assert set(tokens.tolist()) <= set(allowed[row].tolist())
        assert len(set(tokens.tolist())) == k  # and every one of them is reachable


def test_tiny_top_p_keeps_only_the_most_likely_token():
    logits = random_logits(5, seed=3)
    for u in (0.0, 0.5, 0.999999):
        tokens = sample(logits, batch(5, temperature=1.0, top_p=1e-6, uniform=u))
        assert tokens.tolist() == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_match_the_softmax(temperature):
    logits = random_logits(1, seed=4)[0]
    expected = torch.softmax(logits.double() / temperature, dim=-1)
    observed = frequencies(logits, temperature=temperature)
    assert_close(observed, expected, atol=2e-3, rtol=0)


def test_top_p_frequencies_are_the_renormalised_nucleus():
    logits = random_logits(1, seed=5, scale=0.7)[0]
    probs = torch.softmax(logits.double(), dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs
    nucleus = order[before < 0.7]  # the smallest set of most likely tokens with mass >= 0.7
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert 1 < len(nucleus) < V
    assert_close(frequencies(logits, top_p=0.7), expected, atol=2e-3, rtol=0)


def test_top_k_frequencies_are_the_renormalised_top_k():
    logits = random_logits(1, seed=6)[0]
    probs = torch.softmax(logits.double(), dim=-1)
    top = logits.topk(4).indices
    expected = torch.zeros_like(probs)
    expected[top] = probs[top] / probs[top].sum()
    assert_close(frequencies(logits, top_k=4), expected, atol=2e-3, rtol=0)


def test_rows_are_independent_of_the_rest_of_the_batch():
    """A row's token depends on its own logits, parameters and uniform only, also when the
    other rows turn on top-k or top-p (which the sampler handles by sorting)."""
    own = random_logits(1, seed=7)
    own_params = dict(temperature=0.9, top_k=0, top_p=1.0)
    for u in grid(40):
        alone = sample(own, batch(1, uniform=u, **own_params)).item()
        for seed, others in enumerate(
            [
                dict(temperature=[0.0, 0.0, 0.0], top_k=[0, 0, 0], top_p=[1.0, 1.0, 1.0]),
                dict(temperature=[2.0, 0.7, 1.0], top_k=[3, 0, 1], top_p=[1.0, 1.0, 1.0]),
                dict(temperature=[0.5, 1.0, 0.0], top_k=[0, 5, 0], top_p=[0.3, 0.9, 1.0]),
            ]
        ):
            logits = torch.cat(
                [random_logits(1, seed=100 + seed), own, random_logits(2, seed=200 + seed)]
            )
            params = batch(
                4,
                temperature=[
                    others["temperature"][0],
                    own_params["temperature"],
                    *others["temperature"][1:],
                ],
                top_k=[others["top_k"][0], own_params["top_k"], *others["top_k"][1:]],
                top_p=[others["top_p"][0], own_params["top_p"], *others["top_p"][1:]],
                uniform=[0.9, u, 0.1, 0.5],
            )
            assert sample(logits, params)[1].item() == alone


def test_rows_with_filters_are_independent_of_the_rest_of_the_batch():
    own = random_logits(1, seed=8)
    for u in grid(40):
        alone = sample(own, batch(1, temperature=1.3, top_k=6, top_p=0.8, uniform=u)).item()
        logits = torch.cat([own, random_logits(2, seed=9)])
        params = batch(
            3,
            temperature=[1.3, 0.0, 0.4],
            top_k=[6, 0, 2],
            top_p=[0.8, 1.0, 0.2],
            uniform=[u, 0.7, 0.2],
        )
        assert sample(logits, params)[0].item() == alone


@pytest.mark.parametrize("uniform", [0.0, 1e-12, 0.5, 1 - 1e-9, 1 - 2**-53])
@pytest.mark.parametrize(
    "filters", [dict(), dict(top_k=3), dict(top_p=0.95), dict(top_k=5, top_p=0.9)]
)
def test_a_token_of_zero_probability_is_never_picked(uniform, filters):
    logits = random_logits(3, seed=10)
    impossible = [0, V - 1, 4]  # first and last in vocabulary order, and one in the middle
    logits[:, impossible] = float("-inf")
    tokens = sample(logits, batch(3, temperature=1.0, uniform=uniform, **filters))
    assert not set(tokens.tolist()) & set(impossible)


def test_only_one_possible_token_is_always_picked():
    logits = torch.full((1, V), float("-inf"))
    logits[0, 7] = 0.0
    for u in (0.0, 0.5, 1 - 2**-53):
        for filters in (dict(), dict(top_k=3), dict(top_p=0.5)):
            assert sample(logits, batch(1, uniform=u, **filters)).item() == 7


def test_tiny_temperature_is_nearly_greedy():
    """A temperature near 0 must not overflow the scaled logits into NaN."""
    logits = torch.tensor([[5.0, 1.0, 4.9, -2.0]])
    for u in (0.0, 0.5, 0.99):
        for temperature in (1e-38, 1e-30, 1e-6):
            assert sample(logits, batch(1, temperature=temperature, uniform=u)).item() == 0


def test_token_logprobs():
    logits = random_logits(4, seed=11)
    tokens = torch.tensor([0, 5, 11, 3])
    chosen, values, ids = token_logprobs(logits, tokens, top_k=3)
    expected = torch.log_softmax(logits, dim=-1)
    assert_close(chosen, expected.gather(1, tokens[:, None]).squeeze(1))
    assert values.shape == ids.shape == (4, 3)
    assert bool((values <= 0).all())
    assert bool((values[:, :-1] >= values[:, 1:]).all())  # sorted, most likely first
    assert_close(values, expected.gather(1, ids))
    assert ids[:, 0].tolist() == logits.argmax(dim=-1).tolist()


def test_token_logprobs_top_zero_and_more_than_the_vocabulary():
    logits = random_logits(2, seed=12)
    _, values, ids = token_logprobs(logits, torch.tensor([1, 2]), top_k=0)
    assert values.shape == ids.shape == (2, 0)
    _, values, _ = token_logprobs(logits, torch.tensor([1, 2]), top_k=V + 5)
    assert values.shape == (2, V)
    assert_close(values.exp().sum(dim=-1), torch.ones(2, dtype=values.dtype))


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_min_p_frequencies_drop_tokens_below_min_p_times_the_top(temperature):
    """vLLM's min-p: a token stays when its probability (after temperature) is at least
    min_p times the most likely token's; the survivors are renormalised."""
    logits = random_logits(1, seed=13, scale=1.0)[0]
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    keep = probs >= 0.3 * probs.max()
    assert 1 < int(keep.sum()) < V  # the test would prove nothing otherwise
    expected = torch.where(keep, probs, torch.zeros_like(probs))
    expected /= expected.sum()
    observed = frequencies(logits, temperature=temperature, min_p=0.3)
    assert_close(observed, expected, atol=2e-3, rtol=0)
    assert not bool(observed[~keep].any())


def test_min_p_zero_is_off_and_one_keeps_only_the_top():
    logits = random_logits(1, seed=14)[0]
    assert_close(frequencies(logits, min_p=0.0), frequencies(logits))
    for u in grid(20):
        assert sample(logits[None], batch(1, min_p=1.0, uniform=u)).item() == logits.argmax()


def test_min_p_is_per_row_in_a_mixed_batch():
    """Each row filters with its own min_p; a row without min_p is untouched by the others."""
    own = random_logits(1, seed=15, scale=1.0)
    for u in grid(40):
        for own_min_p in (0.0, 0.2, 0.6):
            alone = sample(own, batch(1, min_p=own_min_p, uniform=u)).item()
            logits = torch.cat([random_logits(1, seed=16), own, random_logits(1, seed=17)])
            params = batch(3, min_p=[0.9, own_min_p, 0.05], top_k=[0, 0, 3], uniform=[0.3, u, 0.8])
            assert sample(logits, params)[1].item() == alone


def test_slots_build_the_batch_from_the_parameters():
    slots = SamplingSlots(4)
    slots.set(0, SamplingParams(temperature=0.5, top_k=7, top_p=0.9, min_p=0.1))
    slots.set(1, SamplingParams(top_k=10**30))  # no limit: clamped to fit its tensor
    got = slots.batch(2, torch.tensor([0.1, 0.2], dtype=torch.float64))
    assert got.temperature.tolist() == [0.5, 1.0]
    assert got.top_k.tolist() == [7, (1 << 63) - 1]
    assert_close(got.top_p, torch.tensor([0.9, 1.0]))
    assert_close(got.min_p, torch.tensor([0.1, 0.0]))


@pytest.mark.parametrize(
    "bad, param",
    [
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_p=float("nan")), "min_p"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(stop=["x"] * (MAX_STOP_SEQUENCES + 1)), "stop"),
        (dict(logprobs=6), "logprobs"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(logit_bias={3: 101.0}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(prompt_logprobs=6), "prompt_logprobs"),
    ],
)
def test_bad_parameters_name_the_parameter(bad, param):
    with pytest.raises(LMError) as info:
        SamplingParams(**bad).validate()
    assert info.value.param == param


def test_limits_are_checked_in_the_same_place():
    limits = Limits(max_new_tokens=10, max_stop=2, max_stop_chars=3)
    SamplingParams(max_new_tokens=10, stop=["abc", "d"]).validate(limits)
    for bad, param in (
        (dict(max_new_tokens=11), "max_new_tokens"),
        (dict(stop=["a", "b", "c"]), "stop"),
        (dict(stop=["abcd"]), "stop"),
    ):
        with pytest.raises(LMError) as info:
            SamplingParams(**{"max_new_tokens": 5, **bad}).validate(limits)
        assert info.value.param == param
    # A server cannot raise the library's own ceiling.
    with pytest.raises(LMError):
        SamplingParams(stop=["x"] * (MAX_STOP_SEQUENCES + 1)).validate(Limits(max_stop=99))


def _slots_batch(
    params: list[SamplingParams], prompts: list[list[int]], generated: list[list[int]]
) -> SamplingBatch:
    slots = SamplingSlots(len(params), vocab_size=V)
    for row, (p, prompt, done) in enumerate(zip(params, prompts, generated)):
        slots.set(row, p, prompt, done)
    return slots.batch(len(params), torch.full((len(params),), 0.5, dtype=torch.float64))


def test_penalties_follow_vllm_per_row():
    logits = torch.linspace(-2.0, 3.0, V).expand(4, -1).clone()
    params = [
        SamplingParams(),
        SamplingParams(presence_penalty=0.5),
        SamplingParams(frequency_penalty=0.25),
        SamplingParams(repetition_penalty=2.0),
    ]
    prompts, generated = [[1]] * 4, [[11, 11, 0]] * 4
    got = process(logits, _slots_batch(params, prompts, generated))
    assert_close(got[0], logits[0])  # no penalty: untouched, whatever the others ask
    expected = logits[0].clone()
    expected[[0, 11]] -= 0.5  # presence: once per generated token
    assert_close(got[1], expected)
    expected = logits[0].clone()
    expected[11] -= 0.5  # frequency: per occurrence (twice)
    expected[0] -= 0.25
    assert_close(got[2], expected)
    expected = logits[0].clone()
    for token in (0, 1, 11):  # repetition: prompt and generated tokens, by sign
        value = logits[0, token]
        expected[token] = value / 2 if value > 0 else value * 2
    assert_close(got[3], expected)


def test_logit_bias_and_counts_follow_their_rows():
    slots = SamplingSlots(3, vocab_size=V)
    slots.set(0, SamplingParams(logit_bias={4: 100.0}))
    slots.set(1, SamplingParams(frequency_penalty=1.0), [2], [])
    slots.set(2, SamplingParams())
    logits = torch.zeros(3, V)
    logits[:, 7] = 1.0
    greedy = torch.zeros(3, dtype=torch.float64)
    tokens = sample(logits, replace_temperature(slots.batch(3, greedy), 0.0))
    assert tokens.tolist() == [4, 7, 7]
    slots.record(tokens)  # row 1 now has seen 7 once: 1 - 1 = 0, ties go to token 0
    tokens = sample(logits, replace_temperature(slots.batch(3, greedy), 0.0))
    assert tokens.tolist() == [4, 0, 7]
    assert slots.tensors["counts"][1, 7].item() == 1


def replace_temperature(batch_: SamplingBatch, value: float) -> SamplingBatch:
    batch_.temperature = torch.full_like(batch_.temperature, value)
    return batch_
