"""Prefix caching: the block store (match, insert, LRU within a budget, namespaces), and the
engine with it on and off giving the same output, counting queries and hits."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_gpt

from lm import native
from lm.engine import Engine
from lm.models import ModelConfig, build_model
from lm.prefix_cache import PrefixCache
from lm.sampling import SamplingParams
from lm.tokenizers import CharTokenizer


def kv_reader(tokens, block: int = 4):
    """A stand-in model cache: block values are the positions, 4 bytes each."""
    return lambda start, end: [
        {"k0": piece} for piece in torch.arange(start, end, dtype=torch.float32).split(block)
    ]


def test_match_finds_the_longest_cached_prefix_of_whole_blocks():
    cache = PrefixCache(capacity_bytes=10_000, block_tokens=4)
    tokens = list(range(10))
    assert cache.match(tokens) == []
    cache.insert(tokens, kv_reader(tokens))
    assert len(cache) == 2  # 10 tokens: two whole blocks, the last 2 tokens not cached
    chain = cache.match(tokens[:9])
    assert [block.kv["k0"].tolist() for block in chain] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(cache.match(tokens[:7])) == 1  # only whole blocks of the query
    assert cache.match([0, 1, 2, 9, 4, 5, 6, 7]) == []  # a block matches after its prefix only
    assert len(cache.match([0, 1, 2, 3, 9, 9, 9, 9])) == 1
    assert cache.peek(tokens) == 8
    assert cache.queries == 10 + 9 + 7 + 8 + 8 and cache.hits == 0 + 8 + 4 + 0 + 4


def test_namespaces_do_not_share_blocks():
    cache = PrefixCache(capacity_bytes=10_000, block_tokens=4)
    tokens = list(range(8))
    cache.insert(tokens, kv_reader(tokens), namespace=1)
    assert cache.match(tokens, namespace=0) == []
    assert len(cache.match(tokens, namespace=1)) == 2


def test_least_recently_used_blocks_go_first_and_chains_stay_whole():
    block_bytes = 4 * 4
    cache = PrefixCache(capacity_bytes=5 * block_bytes, block_tokens=4)
    a, b = list(range(12)), [100 + t for t in range(12)]
    cache.insert(a, kv_reader(a))  # 3 blocks
    cache.insert(b, kv_reader(b))  # 3 more: over budget by one, a's last block goes
    assert cache.nbytes <= cache.capacity_bytes and cache.evictions == 1
    assert cache.peek(a) == 8 and cache.peek(b) == 12
    cache.match(a)  # a is now the most recent: b's blocks go next, its last one first
    c = [200 + t for t in range(8)]
    cache.insert(c, kv_reader(c))
    assert cache.peek(b) == 4 and cache.peek(a) == 8 and cache.peek(c) == 8
    for block in cache.blocks.values():  # every kept block is reachable from its root
        parent = block.key[0]
        assert isinstance(parent, tuple) or any(b.id == parent for b in cache.blocks.values())


def test_zero_capacity_caches_nothing():
    cache = PrefixCache(capacity_bytes=0, block_tokens=4)
    cache.insert(list(range(8)), kv_reader(None))
    assert len(cache) == 0 and cache.match(list(range(8))) == []


# -- the engine -----------------------------------------------------------------------------

PREFIX = "Q: apple\nA: elppa\nQ: river\nA: revir\nQ: stone\nA: enots\n"
QUERIES = ["garden", "castle", "tiger", "moon", "a", "Bright lanterns"]


@pytest.fixture(scope="module")
def tokenizer(corpus_text) -> CharTokenizer:
    return CharTokenizer.train(corpus_text + PREFIX + "".join(QUERIES) + "BQ")


MODELS = {
    "classic": {},
    "modern": dict(position="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu"),
}
PARAMS = [
    dict(temperature=0.0),
    dict(temperature=0.9, top_k=8, seed=5),
    dict(temperature=1.0, top_p=0.9, repetition_penalty=1.3, seed=6),
]


def generate(engine: Engine, tokenizer, prompts: list[str], together: bool, logprobs=None):
    """Texts, tokens and logprobs for each prompt x params, submitted all at once (one
    batch) or one after another (each request meets the cache its predecessors left)."""
    seqs = []
    for prompt in prompts:
        for params in PARAMS:
            seqs.append(
                engine.submit(
                    tokenizer.encode(prompt),
                    SamplingParams(max_new_tokens=24, logprobs=logprobs, **params),
                )
            )
            if not together:
                engine.run_until_idle()
    engine.run_until_idle()
    return [(s.text, s.generated, s.outputs[-1].logprobs) for s in seqs]


@pytest.fixture
def float32_prefill(monkeypatch):
    """Prefills in float32 products: on a CPU with fast bfloat16 ones, a prefill of enough
    tokens multiplies in bfloat16, and with the cache on, rows are batched differently (how
    far bfloat16 prefill moves log-probabilities: tests/test_models.py, precision_bench)."""
    monkeypatch.setenv("LM_BF16_PREFILL", "0")
    native.bf16_matmul_is_fast.cache_clear()
    yield
    monkeypatch.undo()
    native.bf16_matmul_is_fast.cache_clear()


@pytest.mark.parametrize("blocks", list(MODELS))
@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "batched"])
@pytest.mark.parametrize("kv_cache_dtype", ["bfloat16", "int8"])
def test_output_is_the_same_with_and_without_the_cache(
    tokenizer, blocks, together, kv_cache_dtype, float32_prefill
):
    model = random_gpt(tokenizer.vocab_size, block_size=96, **MODELS[blocks])
    prompts = [PREFIX + f"Q: {query}\nA:" for query in QUERIES]
    prompts.append(PREFIX * 3)  # longer than the context: the sliding window refills rows
    runs = {}
    for mb in (0, 8):
        engine = Engine(
            model, tokenizer, max_batch=8, prefix_cache_mb=mb, kv_cache_dtype=kv_cache_dtype
        )
        runs[mb] = generate(engine, tokenizer, prompts, together, logprobs=1)
        if mb:
            assert engine.prefix_cache.hits > 0
        else:
            assert engine.prefix_cache is None
    for (text0, ids0, lp0), (text1, ids1, lp1) in zip(runs[0], runs[8]):
        assert (text0, ids0) == (text1, ids1)
        assert lp0 == pytest.approx(lp1, abs=1e-3)  # float order only


def test_shared_prefixes_are_counted_as_hits(tokenizer):
    model = random_gpt(tokenizer.vocab_size, block_size=128)
    engine = Engine(model, tokenizer, max_batch=4)
    block = engine.prefix_cache.block_tokens
    first = tokenizer.encode(PREFIX + "Q: garden\nA:")
    engine.submit(first, SamplingParams(max_new_tokens=1))
    engine.run_until_idle()
    assert engine.prefix_cache.hits == 0
    assert engine.prefix_cache.queries == len(first) - 1  # the last token goes to decode
    second = tokenizer.encode(PREFIX + "Q: castle\nA:")
    engine.submit(second, SamplingParams(max_new_tokens=1))
    engine.run_until_idle()
    shared = len(tokenizer.encode(PREFIX + "Q: "))
    assert engine.prefix_cache.hits == shared // block * block


def test_recurrent_models_run_without_a_cache(tokenizer):
    """Recurrent models have no KV cache to keep."""
    lstm = build_model(ModelConfig(kind="lstm", vocab_size=tokenizer.vocab_size, n_embd=16))
    assert Engine(lstm, tokenizer).prefix_cache is None


def test_a_negative_budget_is_refused(tokenizer):
    model = random_gpt(tokenizer.vocab_size, block_size=32)
    with pytest.raises(Exception, match="prefix_cache_mb"):
        Engine(model, tokenizer, prefix_cache_mb=-1)


def test_requests_sharing_an_uncached_prefix_compute_it_once(tokenizer):
    """Four requests with one new prefix admitted in the same step: the prefix is computed
    by the first, and the other three find it cached."""
    model = random_gpt(tokenizer.vocab_size, block_size=128)
    engine = Engine(model, tokenizer, max_batch=8)
    prompts = [tokenizer.encode(PREFIX + f"Q: {query}\nA:") for query in QUERIES[:4]]
    for ids in prompts:
        engine.submit(ids, SamplingParams(max_new_tokens=1))
    engine.run_until_idle()
    block = engine.prefix_cache.block_tokens
    shared = len(tokenizer.encode(PREFIX + "Q: ")) // block * block
    assert engine.prefix_cache.hits == 3 * shared


def test_a_wave_sharing_a_new_prefix_is_admitted_in_one_step(tokenizer, monkeypatch):
    """Within the step's prefill budget, followers cost only what they do not share with
    the first request of their new prefix: four requests fit where two whole prompts do
    not, and their texts are those of requests run one by one."""
    model = random_gpt(tokenizer.vocab_size, block_size=128)
    prompts = [tokenizer.encode(PREFIX + f"Q: {query}\nA:") for query in QUERIES[:4]]
    alone = []
    for ids in prompts:
        engine = Engine(model, tokenizer, max_batch=8)
        seq = engine.submit(ids, SamplingParams(max_new_tokens=6, temperature=0.0))
        engine.run_until_idle()
        alone.append(seq.generated)
    monkeypatch.setattr("lm.engine.PREFILL_TOKENS", len(prompts[0]) + 60)  # not 2 prompts
    engine = Engine(model, tokenizer, max_batch=8)
    seqs = [
        engine.submit(ids, SamplingParams(max_new_tokens=6, temperature=0.0)) for ids in prompts
    ]
    engine.step()
    assert engine.num_running == 4 and engine.num_waiting == 0
    engine.run_until_idle()
    assert [s.generated for s in seqs] == alone
