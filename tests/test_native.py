"""The compiled decode-attention kernel: same results as PyTorch, safe on bad input, optional."""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from lm import kv_int8, native
from lm.device import resolve_kv_cache_dtype
from lm.engine import Engine
from lm.models import ModelConfig, build_model
from lm.models.gpt import LayerCache
from lm.sampling import SamplingParams
from lm.tokenizers import CharTokenizer

HEADS, DIM, CTX = 3, 8, 24
NARROW_DTYPES = (torch.float16, torch.bfloat16, torch.int8)  # int8: lm.kv_int8

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="no C compiler on this machine",
)


@pytest.fixture
def char_tokenizer(corpus_text) -> CharTokenizer:
    return CharTokenizer.train(corpus_text)


@pytest.fixture
def kernel():
    attend = native.decode_attention()
    if attend is None and native.native_off():
        pytest.skip("LM_NATIVE=0 turns the kernel off")
    if attend is None and (shutil.which("cc") or shutil.which("gcc")):
        pytest.fail("a C compiler is here, yet the native kernel did not build")
    if attend is None:
        pytest.skip("no C compiler on this machine")
    return attend


@pytest.fixture
def rebuild(tmp_path, monkeypatch):
    """Build (or fail to build) the library afresh in an empty cache directory."""
    monkeypatch.setenv("LM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LM_NATIVE", raising=False)
    native.decode_attention.cache_clear()
    yield tmp_path
    native.decode_attention.cache_clear()


def random_case(dtype: torch.dtype, rows: int = 6, batch: int = 5, seed: int = 0, dim: int = DIM):
    """A layer cache of `rows` rows holding random vectors, and a step for `batch` rows."""
    generator = torch.Generator().manual_seed(seed)
    keys = to_cache(torch.randn(rows, HEADS, CTX, dim, generator=generator), dtype)
    values = to_cache(torch.randn(rows, HEADS, CTX, dim, generator=generator), dtype)
    cache = LayerCache(keys, values)
    qkv = torch.randn(batch, 3 * HEADS * dim, generator=generator)
    positions = torch.tensor([0, CTX - 1, 7, 1, 12][:batch], dtype=torch.long)
    return qkv, cache, positions


def to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return kv_int8.quantize(x) if dtype == torch.int8 else x.to(dtype)


def from_cache(cached: torch.Tensor) -> torch.Tensor:
    return kv_int8.dequantize(cached) if cached.dtype == torch.int8 else cached.float()


def copy(cache: LayerCache) -> LayerCache:
    return LayerCache(*(t.clone() for t in cache))


def same(a: LayerCache, b: LayerCache) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def reference(qkv, cache: LayerCache, positions, scale):
    """The same step in plain PyTorch, one row at a time, in float32 (cache updated)."""
    batch, heads = qkv.shape[0], cache.keys.shape[1]
    dim = qkv.shape[1] // (3 * heads)
    q, k, v = qkv.view(batch, 3, heads, dim).unbind(1)
    out = []
    for row in range(batch):
        p = int(positions[row])
        cache.keys[row, :, p] = to_cache(k[row], cache.keys.dtype)
        cache.values[row, :, p] = to_cache(v[row], cache.values.dtype)
        keys = from_cache(cache.keys[row, :, : p + 1])
        values = from_cache(cache.values[row, :, : p + 1])
        probs = torch.softmax((q[row, :, None] * scale) @ keys.transpose(-1, -2), dim=-1)
        out.append((probs @ values).reshape(-1))
    return torch.stack(out) if out else torch.empty(0, heads * dim)


@pytest.mark.parametrize("dim", [DIM, 32])  # 32: one of the head sizes compiled as constants
@pytest.mark.parametrize("dtype", [torch.float32, *NARROW_DTYPES])
def test_kernel_matches_pytorch_and_writes_the_cache_as_pytorch_does(kernel, dtype, dim):
    qkv, cache, positions = random_case(dtype, dim=dim)
    expected_cache = copy(cache)
    scale = 1 / math.sqrt(dim)
    expected = reference(qkv, expected_cache, positions, scale)
    out = kernel(qkv, cache, positions, scale)
    assert out.dtype == torch.float32 and out.shape == (5, HEADS * dim)
    assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert same(cache, expected_cache)  # bit for bit
    untouched = random_case(dtype, dim=dim)[1]
    assert all(torch.equal(t[5], u[5]) for t, u in zip(cache, untouched))  # past the batch


@pytest.mark.parametrize("threads", [1, 2])
def test_each_row_is_independent_of_its_batch(kernel, threads):
    qkv, cache, positions = random_case(torch.float16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the kernel runs on the caller's thread count
    try:
        together = kernel(qkv, copy(cache), positions, 0.3)
    finally:
        torch.set_num_threads(before)
    for row in range(qkv.shape[0]):
        alone = kernel(
            qkv[row : row + 1],
            LayerCache(*(t[row : row + 1].clone() for t in cache)),
            positions[row : row + 1],
            0.3,
        )
        assert torch.equal(alone[0], together[row])


def test_half_to_float_is_exact_for_every_float16(kernel):
    """The kernel widens float16 with bit arithmetic: check all finite values, subnormals
    included, through a one-key attention whose output is that key's value."""
    values = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    values = values[torch.isfinite(values)]
    batch = math.ceil(values.numel() / DIM)
    v_new = torch.zeros(batch * DIM, dtype=torch.float16)
    v_new[: values.numel()] = values
    qkv = torch.zeros(batch, 3, 1, DIM)
    qkv[:, 2, 0] = v_new.view(batch, DIM).float()
    cache = LayerCache(
        torch.zeros(batch, 1, 1, DIM, dtype=torch.float16),
        torch.zeros(batch, 1, 1, DIM, dtype=torch.float16),
    )
    out = kernel(qkv.view(batch, -1), cache, torch.zeros(batch, dtype=torch.long), 1.0)
    assert torch.equal(out.view(-1), v_new.float())


def _replace(case: dict, **changes) -> dict:
    cache = case["cache"]._replace(**{k: v for k, v in changes.items() if k in LayerCache._fields})
    return {
        **case,
        "cache": cache,
        **{k: v for k, v in changes.items() if k not in LayerCache._fields},
    }


@pytest.mark.parametrize(
    "mistake, message",
    [
        (
            lambda c: _replace(
                c, keys=c["cache"].keys.transpose(2, 3).contiguous().transpose(2, 3)
            ),
            "contiguous",
        ),
        (lambda c: _replace(c, values=c["cache"].values.half()), "share a dtype"),
        (
            lambda c: _replace(c, keys=c["cache"].keys.double(), values=c["cache"].values.double()),
            "float32 projections",
        ),
        (lambda c: _replace(c, qkv=c["qkv"].half()), "float32 projections"),
        (lambda c: _replace(c, qkv=c["qkv"][:, :-1]), "qkv must be"),
        (lambda c: _replace(c, positions=c["positions"] + CTX), r"positions must lie in \[0, 24\)"),
        (lambda c: _replace(c, positions=c["positions"] - 1), r"positions must lie in \[0, 24\)"),
        (lambda c: _replace(c, positions=c["positions"].int()), "int64"),
        (lambda c: _replace(c, positions=c["positions"][:2]), "one entry per row"),
        (
            lambda c: _replace(c, keys=c["cache"].keys[:3], values=c["cache"].values[:3]),
            "contiguous",
        ),
    ],
)
def test_layouts_it_was_not_written_for_are_refused(kernel, mistake, message):
    """The kernel indexes raw memory: anything else must fail before it runs."""
    qkv, cache, positions = random_case(torch.float32)
    case = mistake({"qkv": qkv, "cache": cache, "positions": positions})
    before = copy(cache)
    with pytest.raises(ValueError, match=message):
        kernel(case["qkv"], case["cache"], case["positions"], 1.0)
    assert same(cache, before)


@needs_compiler
def test_the_library_is_built_once_into_the_cache_dir(rebuild):
    assert native.decode_attention() is not None
    built = list((rebuild / "native").glob("attention-*.so"))
    assert len(built) == 1
    native.decode_attention.cache_clear()
    stamp = built[0].stat().st_mtime_ns
    assert native.decode_attention() is not None  # loaded, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp
    assert not [p for p in (rebuild / "native").iterdir() if p != built[0]]  # no leftovers


def test_without_a_compiler_the_pytorch_path_runs(rebuild, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(rebuild / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="lm.native"):
        assert native.decode_attention() is None
    assert "PyTorch path" in caplog.text
    model = build_model(
        ModelConfig(kind="gpt", vocab_size=11, n_layer=1, n_embd=8, n_head=2, block_size=8)
    ).eval()
    assert resolve_kv_cache_dtype(model, torch.device("cpu")) == torch.float32
    with torch.inference_mode():
        logits, _ = model.step(torch.tensor([[1], [2]]), model.init_state(2))
    assert torch.isfinite(logits).all()


def test_lm_native_0_turns_it_off(rebuild, monkeypatch):
    monkeypatch.setenv("LM_NATIVE", "0")
    assert native.decode_attention() is None
    assert not (rebuild / "native").exists()


def test_native_and_pytorch_paths_generate_the_same_text(kernel, monkeypatch, char_tokenizer):
    """Whole requests through the engine, float32 cache: the same tokens either way."""
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            kind="gpt",
            vocab_size=char_tokenizer.vocab_size,
            n_layer=2,
            n_embd=32,
            n_head=4,
            block_size=32,
        )
    ).eval()
    prompts = ["ROMEO:", "What light through yonder", "a"]

    def generate() -> list[list[int]]:
        engine = Engine(model, char_tokenizer, max_batch=4, kv_cache_dtype="float32")
        seqs = [
            engine.submit(
                char_tokenizer.encode(p), SamplingParams(max_new_tokens=40, temperature=0.0)
            )
            for p in prompts
        ]
        engine.run_until_idle()
        return [s.generated for s in seqs]

    with_kernel = generate()
    monkeypatch.setattr("lm.models.gpt.decode_attention", lambda: None)
    assert generate() == with_kernel


def test_auto_cache_is_int8_on_the_cpu_with_the_kernel(kernel, char_tokenizer):
    model = build_model(
        ModelConfig(
            kind="gpt",
            vocab_size=char_tokenizer.vocab_size,
            n_layer=1,
            n_embd=8,
            n_head=2,
            block_size=8,
        )
    )
    assert Engine(model, char_tokenizer, max_batch=2).state["k0"].dtype == torch.int8
    assert resolve_kv_cache_dtype(model.to(torch.float16), torch.device("cpu")) == torch.float16


@settings(max_examples=60, deadline=None)
@given(
    heads=st.integers(1, 4),
    dim=st.sampled_from([1, 3, 16, 32, 40, 64]),
    ctx=st.integers(1, 40),
    rows=st.integers(0, 5),
    extra_rows=st.integers(0, 2),
    dtype=st.sampled_from([torch.float32, *NARROW_DTYPES]),
    seed=st.integers(0, 1000),
)
def test_any_shape_matches_pytorch(heads, dim, ctx, rows, extra_rows, dtype, seed):
    """Head counts and sizes, contexts and batch sizes (empty included), rows at any
    position: the kernel agrees with the row-by-row reference and writes only its rows."""
    attend = native.decode_attention()
    if attend is None:
        pytest.skip("the native kernel is not available here")
    generator = torch.Generator().manual_seed(seed)
    cache = LayerCache(
        to_cache(torch.randn(rows + extra_rows, heads, ctx, dim, generator=generator), dtype),
        to_cache(torch.randn(rows + extra_rows, heads, ctx, dim, generator=generator), dtype),
    )
    qkv = torch.randn(rows, 3 * heads * dim, generator=generator)
    positions = torch.randint(0, ctx, (rows,), generator=generator)
    expected_cache = copy(cache)
    expected = reference(qkv, expected_cache, positions, 0.5)
    out = attend(qkv, cache, positions, 0.5)
    assert out.shape == (rows, heads * dim)
    assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert same(cache, expected_cache)


@needs_compiler
def test_kernel_built_for_an_older_x86_matches_pytorch(older_x86):
    """The AVX2 and the AVX-512-without-BF16 code (vectors of 8 or 16 numbers) against the
    reference, every cache type and the common head sizes."""
    attend = native.decode_attention()
    assert attend is not None
    for dtype in (torch.float32, *NARROW_DTYPES):
        for dim in (8, 16, 32, 64):
            qkv, cache, positions = random_case(dtype, dim=dim)
            expected_cache = copy(cache)
            expected = reference(qkv, expected_cache, positions, 1 / math.sqrt(dim))
            out = attend(qkv, cache, positions, 1 / math.sqrt(dim))
            assert_close(out, expected, atol=1e-5, rtol=1e-5)
            assert same(cache, expected_cache)


@pytest.mark.parametrize("dim", [1, 3, 32])
def test_int8_cache_vectors_round_trip_within_half_a_step(dim):
    """lm.kv_int8: D numbers and a float32 scale (max|x| / 127) in D + 4 bytes; each number
    comes back within half its vector's step; all-zero vectors stay zeros; no vectors, none."""
    x = torch.randn(4, 3, 5, dim, generator=torch.Generator().manual_seed(dim)) * 3
    x[0, 0, 0] = 0.0
    cached = kv_int8.quantize(x)
    assert cached.dtype == torch.int8 and cached.shape == (4, 3, 5, dim + kv_int8.SCALE_BYTES)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((kv_int8.dequantize(cached) - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(kv_int8.dequantize(cached)[0, 0, 0], torch.zeros(dim))
    assert kv_int8.quantize(torch.empty(0, dim)).shape == (0, dim + kv_int8.SCALE_BYTES)
    assert kv_int8.dequantize(cached[:, :, :0]).shape == (4, 3, 0, dim)
