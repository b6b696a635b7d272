"""The compiled whole-model decode step: the logits and caches of GPT.step's PyTorch path,
for every block option and cache dtype, rows at different positions; repacked when the
weights change; not used where it does not apply."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.testing import assert_close

from lm import kv_int8, native
from lm.engine import Engine
from lm.lora import add_lora
from lm.models import ModelConfig, build_model
from lm.native import decode
from lm.sampling import SamplingParams
from lm.tokenizers import CharTokenizer

VOCAB = 23
MODERN = dict(
    position="rope",
    norm="rmsnorm",
    qk_norm=True,
    mlp="swiglu",
    tie_embeddings=False,
    logit_softcap=15.0,
)
OPTIONS = [
    {},
    {"bias": True},
    *({key: value} for key, value in MODERN.items()),
    {"mlp": "relu2"},
    {"position": "rope", "rope_theta": 100.0},
    MODERN,
    {**MODERN, "mlp": "relu2", "bias": True},
    {**MODERN, "norm": "layernorm", "mlp": "gelu", "bias": True},
]
CACHE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]
# float32 caches: the step's own rounding only; narrower caches: a new key or value may
# round to the neighbouring float16/bfloat16 (or int8 step) when the two paths differ in
# the last bit.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.int8: 5e-2}


@pytest.fixture
def native_step():
    """The compiled step (built afresh in the test session's cache directory)."""
    step = decode.decode_step()
    if step is None and native.native_off():
        pytest.skip("LM_NATIVE=0 turns the native code off")
    if step is None and (shutil.which("cc") or shutil.which("gcc")):
        pytest.fail("a C compiler is here, yet the native decode step did not build")
    if step is None:
        pytest.skip("no C compiler on this machine")
    return step


@pytest.fixture
def torch_path(monkeypatch):
    """A context in which GPT.step runs without the compiled whole-model step."""

    class Off:
        def __enter__(self):
            monkeypatch.setattr("lm.models.gpt.decode_step", lambda: None)
            monkeypatch.setattr("lm.models.gpt.generate_step", lambda: None)

        def __exit__(self, *exc):
            monkeypatch.undo()

    return Off


@torch.inference_mode(False)  # parameters with version counters, as a loaded model's
def tiny_gpt(n_head: int = 2, n_embd: int = 16, vocab_size: int = VOCAB, **options):
    torch.manual_seed(0)
    config = ModelConfig(
        kind="gpt",
        vocab_size=vocab_size,
        n_layer=2,
        n_embd=n_embd,
        n_head=n_head,
        block_size=24,
        **options,
    )
    model = build_model(config).eval()
    with torch.no_grad():  # random weights: near-zero initial ones would hide mistakes
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def ids_of(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def prefilled(model, prompt_lengths, cache_dtype):
    """A state whose rows hold prompts of different lengths (so, at different positions)."""
    states = [
        model.step(ids_of(1, n, seed=n), model.init_state(1, cache_dtype=cache_dtype))[1]
        for n in prompt_lengths
    ]
    return {key: torch.cat([s[key] for s in states]) for key in states[0]}


def clone(state):
    return {key: tensor.clone() for key, tensor in state.items()}


def step_with_threads(model, ids, state, threads: int) -> torch.Tensor:
    """A step's logits with `threads` threads, from a copy of `state`."""
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return model.step(ids, clone(state))[0]
    finally:
        torch.set_num_threads(saved)


def assert_same_state(state, expected, atol):
    assert torch.equal(state["pos"], expected["pos"])
    for key in expected:
        if key != "pos":
            assert state[key].dtype == expected[key].dtype
            assert_close(as_float(state[key]), as_float(expected[key]), atol=atol, rtol=0)


def as_float(cached: torch.Tensor) -> torch.Tensor:
    return kv_int8.dequantize(cached) if cached.dtype == torch.int8 else cached.float()


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "classic")
@pytest.mark.parametrize("prompt_lengths", [[5], [1, 9, 3]], ids=["batch1", "batch3"])
@torch.inference_mode()
def test_native_step_equals_the_pytorch_path(
    native_step, torch_path, options, cache_dtype, prompt_lengths
):
    model = tiny_gpt(**options)
    native_state = prefilled(model, prompt_lengths, cache_dtype)
    torch_state = clone(native_state)
    for t in range(8):
        ids = ids_of(len(prompt_lengths), 1, seed=50 + t)
        logits, native_state = model.step(ids, native_state)
        with torch_path():
            expected, torch_state = model.step(ids, torch_state)
        assert logits.shape == (len(prompt_lengths), VOCAB) and logits.dtype == torch.float32
        assert_close(logits, expected, atol=TOLERANCE[cache_dtype], rtol=0)
        assert_same_state(native_state, torch_state, TOLERANCE[cache_dtype])


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=str)
@torch.inference_mode()
def test_a_step_built_for_an_older_x86_equals_the_pytorch_path(older_x86, torch_path, cache_dtype):
    """The AVX2 and AVX-512-without-BF16 builds of the compiled step against the PyTorch
    layers (whose attention is the same build's kernel, which test_native checks against
    PyTorch's), at head size 32."""
    assert decode.decode_step() is not None
    model = tiny_gpt(n_head=2, n_embd=64, **MODERN)
    native_state = prefilled(model, [1, 9, 15], cache_dtype)
    torch_state = clone(native_state)
    for t in range(8):
        ids = ids_of(3, 1, seed=50 + t)
        logits, native_state = model.step(ids, native_state)
        with torch_path():
            expected, torch_state = model.step(ids, torch_state)
        assert_close(logits, expected, atol=TOLERANCE[cache_dtype], rtol=0)
        assert_same_state(native_state, torch_state, TOLERANCE[cache_dtype])


@torch.inference_mode()
def test_step_quantizes_an_int8_cache_as_kv_int8_does(native_step):
    """The compiled step writes a new key or value into an int8 cache byte for byte as
    `kv_int8.quantize` (the PyTorch path's) would: scale, rounding, an all-zero vector.
    Keys and values are the layer's biases alone here (zero weights), so both paths start
    from the same floats."""
    model = tiny_gpt(n_head=2, n_embd=32, bias=True)
    n_embd = 32
    generator = torch.Generator().manual_seed(3)
    bias = torch.randn(2 * n_embd, generator=generator) * 3
    bias[n_embd + 16 :] = 0.0  # the second head's value: all zeros
    bias[5] = 1e-30  # a tiny number beside ordinary ones
    with torch.no_grad():
        attn = model.blocks[0].attn.c_attn
        attn.weight[n_embd:] = 0.0
        attn.bias[n_embd:] = bias
    state = prefilled(model, [4, 2], torch.int8)
    _, state = model.step(ids_of(2, 1), state)
    expected = kv_int8.quantize(bias.view(2, 2, 16))  # [k/v, head, D + 4]
    for row, position in enumerate((4, 2)):
        assert torch.equal(state["k0"][row, :, position], expected[0])
        assert torch.equal(state["v0"][row, :, position], expected[1])
    assert torch.equal(expected[1, 1, :16], torch.zeros(16, dtype=torch.int8))


@pytest.mark.parametrize("n_head, n_embd", [(1, 16), (2, 64), (3, 24), (2, 128)])
@torch.inference_mode()
def test_head_sizes_the_kernel_specialises_and_others(native_step, torch_path, n_head, n_embd):
    model = tiny_gpt(n_head=n_head, n_embd=n_embd, **MODERN)
    native_state = prefilled(model, [2, 7], torch.float32)
    torch_state = clone(native_state)
    ids = ids_of(2, 1, seed=7)
    logits, native_state = model.step(ids, native_state)
    with torch_path():
        expected, torch_state = model.step(ids, torch_state)
    assert_close(logits, expected, atol=1e-4, rtol=0)
    assert_same_state(native_state, torch_state, 1e-5)


@torch.inference_mode()
def test_a_row_does_not_depend_on_its_batch(native_step):
    """Bit for bit: the same row alone or among others gives the same logits."""
    model = tiny_gpt(**MODERN)
    state = prefilled(model, [4, 11, 1], torch.bfloat16)
    ids = ids_of(3, 1, seed=3)
    together, _ = model.step(ids, clone(state))
    for row in range(3):
        alone = {key: tensor[row : row + 1].clone() for key, tensor in state.items()}
        logits, _ = model.step(ids[row : row + 1], alone)
        assert torch.equal(logits[0], together[row])


@pytest.mark.parametrize("options", [{}, MODERN], ids=["classic", "modern"])
def test_greedy_generation_is_the_same_either_way(native_step, torch_path, options):
    """50 greedy tokens for prompts of different lengths, through the engine."""
    tokenizer = CharTokenizer.train("abcdefghijklmnopqrstuvw")
    model = tiny_gpt(vocab_size=tokenizer.vocab_size, **options)
    prompts = ["abc", "helloworld", "w"]

    def generate() -> list[list[int]]:
        engine = Engine(model, tokenizer, max_batch=4, kv_cache_dtype="float32")
        seqs = [
            engine.submit(tokenizer.encode(p), SamplingParams(max_new_tokens=50, temperature=0))
            for p in prompts
        ]
        engine.run_until_idle()
        return [s.generated for s in seqs]

    with_native = generate()
    with torch_path():
        assert generate() == with_native
    assert all(len(tokens) == 50 for tokens in with_native)


@torch.inference_mode()
def test_changed_weights_are_packed_again(native_step, torch_path):
    model = tiny_gpt(**MODERN)
    state = prefilled(model, [3, 6], torch.float32)
    ids = ids_of(2, 1, seed=5)
    model.step(ids, clone(state))  # packs the weights
    other = tiny_gpt(**MODERN)
    with torch.no_grad():
        for param in other.parameters():
            param.normal_(0.0, 0.3)
    changes = [
        lambda: model.load_state_dict(other.state_dict()),  # copied in place
        lambda: model.blocks[1].mlp.c_fc.weight.mul_(-1.0),  # changed in place
        lambda: model.load_state_dict(other.state_dict(), assign=True),  # new parameters
    ]
    for change in changes:
        change()
        logits, _ = model.step(ids, clone(state))
        with torch_path():
            expected, _ = model.step(ids, clone(state))
        assert_close(logits, expected, atol=1e-4, rtol=0)


def test_a_model_made_in_inference_mode_runs_natively(native_step, monkeypatch):
    """Its parameters have no version counters; the pack then watches their storage."""
    from lm.models import gpt

    packs = []
    monkeypatch.setattr(gpt, "pack", lambda *a, **k: packs.append(1) or decode.pack(*a, **k))
    with torch.inference_mode():
        model = build_model(
            ModelConfig(kind="gpt", vocab_size=VOCAB, n_layer=1, n_embd=16, n_head=2, block_size=8)
        ).eval()
        for _ in range(3):
            model.step(ids_of(1, 1), model.init_state(1))
    assert packs == [1]


@torch.inference_mode()
def test_lora_layers_keep_the_pytorch_path(native_step, monkeypatch):
    """A trainable adapter applies to every row: the native step (base weights only) must
    not run, and decoding keeps the adapter's delta."""
    model = tiny_gpt()
    model.step(ids_of(1, 1), prefilled(model, [4], torch.float32))  # packed without adapter
    add_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    monkeypatch.setattr("lm.models.gpt.pack", lambda *a, **k: pytest.fail("packed"))
    logits, _ = model.step(ids_of(1, 1), prefilled(model, [4], torch.float32))
    prompt = torch.cat([ids_of(1, 4, seed=4), ids_of(1, 1)], dim=1)
    assert_close(logits[0], model(prompt)[0, -1], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_large_batches_and_threads_give_each_row_the_same_logits(native_step, torch_path):
    """The native step runs at every batch size. 37 rows (pairs of rows and a last one alone
    in the matrix kernels, output widths that are not multiples of 8): bit for bit the same
    with 1 or 2 threads and for a row alone, and the PyTorch path's logits."""
    model = tiny_gpt(n_head=2, n_embd=40, **MODERN)
    lengths = [1 + (7 * row) % 20 for row in range(37)]
    state = prefilled(model, lengths, torch.float32)
    ids = ids_of(37, 1, seed=9)
    one, two = (step_with_threads(model, ids, state, n) for n in (1, 2))
    assert torch.equal(one, two)
    for row in (0, 17, 36):
        alone = {key: tensor[row : row + 1].clone() for key, tensor in state.items()}
        logits, _ = model.step(ids[row : row + 1], alone)
        assert torch.equal(logits[0], one[row])
    with torch_path():
        expected, _ = model.step(ids, clone(state))
    assert_close(one, expected, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_bad_input_is_refused_before_any_write(native_step):
    model = tiny_gpt()
    state = prefilled(model, [3], torch.float16)
    before = clone(state)
    with pytest.raises(IndexError, match=r"\[0, 23\)"):
        model.step(torch.tensor([[VOCAB]]), state)
    full = {**state, "pos": torch.tensor([24])}
    with pytest.raises(ValueError, match="block size"):
        model.step(ids_of(1, 1), full)
    assert_same_state(state, before, 0)
    packed = model._native_weights()
    keys = [state[f"k{i}"] for i in range(2)]
    values = [state[f"v{i}"] for i in range(2)]
    with pytest.raises(ValueError, match="contiguous"):
        native_step(packed, ids_of(1), state["pos"], [k.transpose(2, 3) for k in keys], values)
    with pytest.raises(ValueError, match="one dtype"):
        native_step(packed, ids_of(1), state["pos"], keys, [v.float() for v in values])
    with pytest.raises(ValueError, match="int64"):
        native_step(packed, ids_of(1).int(), state["pos"], keys, values)
    assert_same_state(state, before, 0)


def test_lm_native_0_or_no_compiler_leave_the_pytorch_path(monkeypatch, tmp_path):
    model = tiny_gpt()
    with torch.inference_mode():
        state = prefilled(model, [2], torch.float32)
        expected, _ = model.step(ids_of(1, 1), clone(state))
    for env, value in (("LM_NATIVE", "0"), ("CC", str(tmp_path / "no-such-compiler"))):
        monkeypatch.setenv("LM_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv(env, value)
        clear_native_caches()
        assert decode.decode_step() is None
        assert decode.generate_step() is None and decode.draw() is None
        with torch.inference_mode():
            logits, _ = model.step(ids_of(1, 1), clone(state))
            assert model.generate_run(3, 0, clone(state), 0.0, [0.5, 0.5]) is None
        assert_close(logits, expected, atol=1e-4, rtol=0)
        monkeypatch.undo()
    clear_native_caches()


def clear_native_caches() -> None:
    for function in (decode.decode_step, decode.generate_step, decode.draw):
        function.cache_clear()
    native.decode_attention.cache_clear()


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.0),
        dict(temperature=0.9, seed=11),
        dict(temperature=1.3, seed=5, stop=["ab"]),
    ],
    ids=["greedy", "sampled", "stop"],
)
def test_a_sequence_alone_runs_in_compiled_calls_with_the_per_step_tokens(
    native_step, monkeypatch, params
):
    """One sequence, nobody waiting: runs of up to RUN_TOKENS tokens per compiled call
    (through context shifts: 70 tokens in a context of 24), the tokens and text of the
    per-step path for the same seed."""
    tokenizer = CharTokenizer.train("abcdefghijklmnopqrstuvw")
    model = tiny_gpt(vocab_size=tokenizer.vocab_size, **MODERN)
    runs = []
    real_run = model.generate_run
    monkeypatch.setattr(
        model, "generate_run", lambda *args: runs.append(len(args[-1])) or real_run(*args)
    )

    def generate() -> tuple[list[int], str, str]:
        engine = Engine(model, tokenizer, max_batch=4)
        seq = engine.submit(
            tokenizer.encode("abc"), SamplingParams(max_new_tokens=70, **params), stream=True
        )
        engine.run_until_idle()
        return seq.generated, seq.text, seq.finish_reason

    in_runs = generate()
    assert runs and max(runs) > 1
    monkeypatch.setattr("lm.engine.RUN_TOKENS", 1)  # every token its own step
    runs.clear()
    assert generate() == in_runs
    assert not runs
    if "stop" not in params:
        assert len(in_runs[0]) == 70


# -- bfloat16 products (LM_BF16_DECODE) -------------------------------------------------


@pytest.fixture
def bf16_step(native_step, monkeypatch):
    """The native step with its matrices in bfloat16 (the default where the build has
    them; the suite otherwise runs in float32, tests/conftest.py)."""
    if not decode.bf16_weights():
        pytest.skip("this CPU has no bfloat16 dot products (AVX512-BF16)")
    monkeypatch.setenv("LM_BF16_DECODE", "1")
    decode.bf16_decode.cache_clear()
    yield native_step
    monkeypatch.setenv("LM_BF16_DECODE", "0")
    decode.bf16_decode.cache_clear()


@pytest.fixture
def rounded_products(monkeypatch, torch_path):
    """A context in which GPT.step runs its PyTorch path with every matrix product's
    inputs and weights rounded to bfloat16 (sums in float32): what the bfloat16 step
    computes, summed in another order."""
    linear = torch.nn.functional.linear

    def rounded(x, weight, bias=None):
        return linear(x.bfloat16().float(), weight.bfloat16().float(), bias)

    return linear_context(monkeypatch, torch_path, rounded)


def linear_context(monkeypatch, torch_path, linear):
    """A context in which GPT.step runs its PyTorch path with `linear` as F.linear."""

    class Patched:
        def __enter__(self):
            torch_path().__enter__()
            monkeypatch.setattr(torch.nn.functional, "linear", linear)

        def __exit__(self, *exc):
            monkeypatch.undo()

    return Patched


@pytest.mark.parametrize(
    "options", OPTIONS[:2] + OPTIONS[-3:], ids=lambda o: ",".join(o) or "classic"
)
@pytest.mark.parametrize("prompt_lengths", [[5], [1, 9, 3]], ids=["batch1", "batch3"])
@torch.inference_mode()
def test_bf16_step_computes_the_rounded_products(
    bf16_step, torch_path, rounded_products, options, prompt_lengths
):
    """The bfloat16 step's logits and caches are the PyTorch path's with rounded products
    (within the float32 sums' order), and differ from the float32 path's by the rounding."""
    model = tiny_gpt(n_embd=40, **options)  # SwiGLU's hidden width is odd: a half pair
    native_state = prefilled(model, prompt_lengths, torch.float32)
    rounded_state, exact_state = clone(native_state), clone(native_state)
    worst_rounded = worst_exact = 0.0
    for t in range(6):
        ids = ids_of(len(prompt_lengths), 1, seed=50 + t)
        logits, native_state = model.step(ids, native_state)
        with rounded_products():
            expected, rounded_state = model.step(ids, rounded_state)
        with torch_path():
            exact, exact_state = model.step(ids, exact_state)
        worst_rounded = max(worst_rounded, float((logits - expected).abs().max()))
        worst_exact = max(worst_exact, float((logits - exact).abs().max()))
        assert_same_state(native_state, rounded_state, atol=2e-3)
    assert worst_rounded < 2e-3
    assert worst_exact > 10 * worst_rounded


def assert_rows_independent(rows: int, cache_dtype: torch.dtype) -> None:
    """A row's logits are bit for bit the same with 1 or 2 threads and alone as in a batch
    of `rows` at spread positions."""
    model = tiny_gpt(n_head=2, n_embd=40, **MODERN)
    lengths = [1 + (7 * row) % 20 for row in range(rows)]
    state = prefilled(model, lengths, cache_dtype)
    ids = ids_of(rows, 1, seed=9)
    one, two = (step_with_threads(model, ids, state, n) for n in (1, 2))
    assert torch.equal(one, two)
    for row in {0, rows // 2, rows - 1}:
        alone = {key: tensor[row : row + 1].clone() for key, tensor in state.items()}
        logits, _ = model.step(ids[row : row + 1], alone)
        assert torch.equal(logits[0], one[row])


@pytest.mark.parametrize("rows", [1, 37, 45])
@torch.inference_mode()
def test_bf16_rows_do_not_depend_on_batch_or_threads(bf16_step, rows):
    assert_rows_independent(rows, torch.bfloat16)


@torch.inference_mode()
def test_bf16_setting_repacks_and_runs_alone_as_in_batches(bf16_step, monkeypatch):
    """Turning LM_BF16_DECODE off repacks in float32; a sequence alone (compiled runs of
    tokens) gets the tokens of the per-step path in bfloat16 too."""
    model = tiny_gpt(n_embd=40, **MODERN)
    state = prefilled(model, [4], torch.float32)
    bf16, _ = model.step(ids_of(1, 1), clone(state))
    assert model._native_weights().bf16
    monkeypatch.setenv("LM_BF16_DECODE", "0")
    decode.bf16_decode.cache_clear()
    exact, _ = model.step(ids_of(1, 1), clone(state))
    assert not model._native_weights().bf16 and not torch.equal(bf16, exact)
    monkeypatch.setenv("LM_BF16_DECODE", "1")
    decode.bf16_decode.cache_clear()
    tokenizer = CharTokenizer.train("abcdefghijklmnopqrstuvw")
    model = tiny_gpt(n_embd=40, vocab_size=tokenizer.vocab_size, **MODERN)

    def generate() -> list[int]:
        engine = Engine(model, tokenizer, max_batch=4)
        seq = engine.submit(
            tokenizer.encode("abc"), SamplingParams(max_new_tokens=40, temperature=0.9, seed=3)
        )
        engine.run_until_idle()
        return seq.generated

    in_runs = generate()
    monkeypatch.setattr("lm.engine.RUN_TOKENS", 1)
    assert generate() == in_runs


# -- int8 products (LM_DECODE_MATRICES=int8) ---------------------------------------------


@pytest.fixture
def i8_step(native_step):
    """The native step with its matrices in int8 (AVX512-VNNI builds). Its own patch: the
    contexts below undo theirs (`monkeypatch.undo`)."""
    if not decode.i8_weights():
        pytest.skip("this CPU has no int8 dot products (AVX512-VNNI)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LM_DECODE_MATRICES", "int8")
        yield native_step


@pytest.fixture
def quantized_products(monkeypatch, torch_path):
    """A context in which GPT.step runs its PyTorch path with every matrix product's
    weights rounded to int8 per output and its inputs per row (`decode.quantize_rows`),
    the integer products summed exactly: what the int8 step computes."""

    def quantized(x, weight, bias=None):
        qx, x_scale = decode.quantize_rows(x)
        qw, w_scale = decode.quantize_rows(weight)
        sums = qx.double() @ qw.double().T  # exact: below 2**53
        y = sums.float() * (x_scale[..., None] * w_scale)
        return y if bias is None else y + bias

    return linear_context(monkeypatch, torch_path, quantized)


@pytest.mark.parametrize(
    "options", OPTIONS[:2] + OPTIONS[-3:], ids=lambda o: ",".join(o) or "classic"
)
@pytest.mark.parametrize("prompt_lengths", [[5], [1, 9, 3]], ids=["batch1", "batch3"])
@torch.inference_mode()
def test_i8_step_computes_the_quantized_products(
    i8_step, torch_path, quantized_products, options, prompt_lengths
):
    """Step by step from the same state, the int8 step's logits and new keys and values
    are the PyTorch path's with quantized products: the same integers, so equal within a
    few float32 roundings, but where the two paths' floats (norms, attention) differ in
    the last bit on either side of a rounding boundary, an input rounds to the
    neighbouring integer: a few numbers then differ by about one quantization step. Both
    differ from the float32 path's by the quantization."""
    model = tiny_gpt(n_embd=44, **options)  # widths that are not multiples of 4 or 16
    state = prefilled(model, prompt_lengths, torch.float32)
    assert model._native_weights().matrices == "int8"
    close, total, worst, worst_exact = 0, 0, 0.0, 0.0
    for t in range(6):
        ids = ids_of(len(prompt_lengths), 1, seed=50 + t)
        logits, native_state = model.step(ids, clone(state))
        with quantized_products():
            expected, quantized_state = model.step(ids, clone(state))
        with torch_path():
            exact, _ = model.step(ids, clone(state))
        new = [(native_state, quantized_state)] if t else []
        for got, want in [(logits, expected)] + [
            (as_float(a[key]), as_float(b[key])) for a, b in new for key in a if key != "pos"
        ]:
            diff = (got - want).abs()
            close += int((diff <= 1e-5).sum())
            total += diff.numel()
            worst = max(worst, float(diff.max()))
        worst_exact = max(worst_exact, float((logits - exact).abs().max()))
        state = native_state
    assert close >= 0.97 * total
    assert worst < 0.1
    assert worst_exact > 0.005


@pytest.mark.parametrize("rows", [1, 37, 45])
@torch.inference_mode()
def test_i8_rows_do_not_depend_on_batch_or_threads(i8_step, rows):
    assert_rows_independent(rows, torch.int8)


@torch.inference_mode()
def test_i8_step_keeps_a_non_finite_row_to_itself(i8_step):
    """A row whose numbers overflow gets non-finite logits (which the engine reports for
    that row) instead of a finite answer rounded from garbage; its neighbours are as
    without it."""
    model = tiny_gpt(n_embd=40, **MODERN)
    state = prefilled(model, [3, 4, 5], torch.float32)
    prompts = {int(t) for n in (3, 4, 5) for t in ids_of(1, n, seed=n).flatten()}
    bad, good = max(set(range(VOCAB)) - prompts), min(prompts)
    with torch.no_grad():
        model.wte.weight[bad] = float("inf")  # a token no prompt holds
    ids = torch.tensor([[good], [bad], [good]])
    logits, _ = model.step(ids, clone(state))
    assert not logits[1].isfinite().any()
    assert logits[[0, 2]].isfinite().all()
    alone, _ = model.step(ids[[0, 2]], {key: t[[0, 2]].clone() for key, t in state.items()})
    assert torch.equal(alone, logits[[0, 2]])


@torch.inference_mode()
def test_i8_setting_repacks(i8_step, monkeypatch):
    model = tiny_gpt(n_embd=40, **MODERN)
    state = prefilled(model, [4], torch.float32)
    i8, _ = model.step(ids_of(1, 1), clone(state))
    assert model._native_weights().matrices == "int8"
    monkeypatch.setenv("LM_DECODE_MATRICES", "float32")
    exact, _ = model.step(ids_of(1, 1), clone(state))
    assert model._native_weights().matrices == "float32" and not torch.equal(i8, exact)


@torch.inference_mode()
def test_a_build_without_int8_products_falls_back_and_refuses_them(older_x86, monkeypatch):
    """The AVX2 and AVX-512-without-VNNI builds have no int8 matrices: asked for them, a
    model packs its matrices as it would otherwise, and the step refuses an int8 pack."""
    assert decode.decode_step() is not None and not decode.i8_weights()
    monkeypatch.setenv("LM_DECODE_MATRICES", "int8")
    model = tiny_gpt(n_embd=40, **MODERN)
    state = prefilled(model, [4], torch.float32)
    logits, _ = model.step(ids_of(1, 1), clone(state))
    assert model._native_weights().matrices == "float32"
    with pytest.raises(ValueError, match="int8"):
        decode.decode_step()(
            model._pack("int8"),
            torch.tensor([1]),
            state["pos"].clone(),
            [state[f"k{i}"] for i in range(2)],
            [state[f"v{i}"] for i in range(2)],
        )


@torch.inference_mode()
def test_an_engine_packs_the_matrices_it_is_told(i8_step):
    """`Engine(decode_matrices=...)` (lm serve's --decode-matrices) decides over the
    LM_DECODE_MATRICES variable (int8 here); a value it does not know is refused."""
    from lm.errors import LMError

    tokenizer = CharTokenizer.train("abcdefghijklmnopqrstuvw")
    for asked, packed in (("float32", "float32"), ("auto", "int8"), ("int8", "int8")):
        model = tiny_gpt(n_embd=40, vocab_size=tokenizer.vocab_size, **MODERN)
        engine = Engine(model, tokenizer, max_batch=2, decode_matrices=asked)
        seq = engine.submit(tokenizer.encode("abc"), SamplingParams(max_new_tokens=3))
        engine.run_until_idle()
        assert len(seq.generated) == 3
        assert model._native_weights().matrices == packed
    with pytest.raises(LMError, match="decode_matrices"):
        Engine(model, tokenizer, decode_matrices="int4")
