"""A whole GPT decode step in one C call (`decode.c`), over weights packed once.

`pack()` copies a model's float32 tensors into one contiguous buffer, in the slots that
`decode.c` reads (named in `GLOBAL_SLOTS` and `LAYER_SLOTS`); `decode_step()` returns the
compiled step, which takes a pack, one new token per row, the rows' positions and the
per-layer KV caches, writes the new keys and values into the caches and returns the
next-token logits. `lm.models.gpt.GPT.step` uses it for decode steps on the CPU, with
its matrices in bfloat16 where the build multiplies bfloat16 pairs (`bf16_decode`), or in
int8 where asked and the build multiplies bytes (`decode_matrices`).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lm import kv_int8
from lm.errors import LMError
from lm.native import CACHE_DTYPES, load_library, switched_off

SOURCE = Path(__file__).with_name("decode.c")
GLOBAL_SLOTS = ("wte", "wpe", "ln_f.weight", "ln_f.bias", "lm_head", "rope_cos", "rope_sin")
LAYER_SLOTS = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.q_norm",
    "attn.k_norm",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
# Matrices [out, in] that decode.c multiplies: packed in panels of PANEL outputs, [in][PANEL]
# each (padded with zeros to an even number of panels), so that one vector load holds eight
# outputs' weights for one input.
PANELLED = {
    "lm_head",
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
}
PANEL = 8
MATRICES = ("float32", "bfloat16", "int8")  # what decode.c's matrices hold (shape[8])
DECODE_MATRICES = ("auto", *MATRICES)  # what a user may ask for (`decode_matrices`)
MLP_KINDS = ("gelu", "relu2", "swiglu")
_FUNCTIONS = {
    torch.float32: "lm_gpt_decode_f32",
    torch.float16: "lm_gpt_decode_f16",
    torch.bfloat16: "lm_gpt_decode_bf16",
    torch.int8: "lm_gpt_decode_i8",
}
_GENERATE = {
    torch.float32: "lm_gpt_generate_f32",
    torch.float16: "lm_gpt_generate_f16",
    torch.bfloat16: "lm_gpt_generate_bf16",
    torch.int8: "lm_gpt_generate_i8",
}
_ALIGN = 16  # floats: each tensor starts on a 64-byte boundary


@dataclass(frozen=True)
class PackedGPT:
    """A GPT's weights in `decode.c`'s layout, and the numbers that describe it."""

    weights: torch.Tensor  # float32, every tensor of `slots` one after the other
    offsets: torch.Tensor  # int64, where each slot starts in `weights` (-1: absent)
    shape: torch.Tensor  # int64: n_layer, n_embd, n_head, hidden, vocab, context, norm, mlp,
    # matrices (MATRICES: 0 float32, 1 bfloat16 pairs, 2 int8)
    numbers: torch.Tensor  # float32: norm eps, QK-norm eps, logit soft-cap

    @property
    def n_layer(self) -> int:
        return int(self.shape[0])

    @property
    def matrices(self) -> str:
        return MATRICES[int(self.shape[8])]

    @property
    def bf16(self) -> bool:
        return self.matrices == "bfloat16"


def pack(
    tensors: dict[str, torch.Tensor | None],
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    hidden: int,
    vocab: int,
    context: int,
    rmsnorm: bool,
    mlp: str,
    eps: float,
    qk_eps: float,
    softcap: float,
    matrices: str = "float32",
) -> PackedGPT:
    """Copy `tensors` (named as `GLOBAL_SLOTS`, and `LAYER_SLOTS` prefixed `blocks.{i}.`;
    absent or None where the model has no such part) into one float32 buffer, matrices in
    panels (`PANELLED`): float32, bfloat16 pairs (`_bf16_panels`) or int8 with scales
    (`_i8_panels`), as `matrices` says. A tensor that fills two slots in one layout is
    stored once."""
    panels = {"float32": _panels, "bfloat16": _bf16_panels, "int8": _i8_panels}[matrices]
    names = [*GLOBAL_SLOTS, *(f"blocks.{i}.{s}" for i in range(n_layer) for s in LAYER_SLOTS)]
    offsets, chunks, seen, size = [], [], {}, 0
    for name in names:
        tensor = tensors.get(name)
        if tensor is None:
            offsets.append(-1)
            continue
        panelled = name.split(".", 2)[-1] in PANELLED
        key = (id(tensor), panelled)
        if key in seen:
            offsets.append(seen[key])
            continue
        seen[key] = size
        offsets.append(size)
        flat = tensor.detach().to(torch.float32)
        if mlp == "swiglu" and name.split(".", 2)[-1].startswith("mlp.c_fc."):
            flat = _gate_up_panels(flat, hidden)
        if panelled:
            flat = panels(flat)
        else:
            flat = flat.reshape(-1)
        padding = -flat.numel() % _ALIGN
        chunks += [flat, flat.new_zeros(padding)]
        size += flat.numel() + padding
    weights = torch.cat(chunks) if chunks else torch.zeros(0)
    if weights.data_ptr() % 64:  # realign the whole buffer (torch's CPU allocator aligns)
        aligned = torch.empty(weights.numel() + _ALIGN)
        start = (-aligned.data_ptr() // 4) % _ALIGN
        aligned[start : start + weights.numel()] = weights
        weights = aligned[start : start + weights.numel()]
    shape = [n_layer, n_embd, n_head, hidden, vocab, context, int(rmsnorm), MLP_KINDS.index(mlp)]
    shape.append(MATRICES.index(matrices))
    return PackedGPT(
        weights=weights,
        offsets=torch.tensor(offsets, dtype=torch.int64),
        shape=torch.tensor(shape, dtype=torch.int64),
        numbers=torch.tensor([eps, qk_eps, softcap], dtype=torch.float32),
    )


def _gate_up_panels(fc: torch.Tensor, hidden: int) -> torch.Tensor:
    """SwiGLU's fc rows (or biases), gate [0, hidden) then up [hidden, 2 hidden), reordered
    so that PANEL gate rows and the PANEL up rows of the same units alternate (each half
    padded with zeros to whole panels): decode.c activates a group of panels as soon as it
    has computed it."""
    gate, up = fc[:hidden], fc[hidden:]
    units = -(-hidden // PANEL) * PANEL
    padded = fc.new_zeros(2, units, *fc.shape[1:])
    padded[0, :hidden], padded[1, :hidden] = gate, up
    return (
        padded.reshape(2, units // PANEL, PANEL, *fc.shape[1:])
        .transpose(0, 1)
        .reshape(2 * units, *fc.shape[1:])
    )


def _panels(matrix: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [panels, in, PANEL], flattened: panel p holds outputs PANEL*p ..
    PANEL*p + PANEL-1, input by input (zeros past the last output), in an even number of
    panels (decode.c multiplies two at a time)."""
    out, width = matrix.shape
    padded = matrix.new_zeros(-(-out // (2 * PANEL)) * 2 * PANEL, width)
    padded[:out] = matrix
    return padded.reshape(-1, PANEL, width).transpose(1, 2).reshape(-1)


def _bf16_panels(matrix: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [panels, in / 2, PANEL, 2] in bfloat16 (rounded to nearest even),
    flattened and seen as float32 words: panel p holds outputs PANEL*p .. PANEL*p + PANEL-1,
    the weights of inputs 2i and 2i + 1 side by side for each (zeros past the last output
    and, for an odd width, past the last input), in an even number of panels."""
    out, width = matrix.shape
    padded = matrix.new_zeros(-(-out // (2 * PANEL)) * 2 * PANEL, width + width % 2)
    padded[:out, :width] = matrix
    pairs = padded.to(torch.bfloat16).reshape(-1, PANEL, padded.shape[1] // 2, 2)
    return pairs.transpose(1, 2).contiguous().reshape(-1).view(torch.float32)


_STEP = torch.tensor(1.0 / 127.0, dtype=torch.float32)  # as decode.c rounds its constant


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of float32 `x[..., n]` as int8 numbers and one float32 scale, as decode.c
    rounds weights (per output) and inputs (per row): scale = max|x| * (1/127),
    q = round(x * (1 / scale)) (halves to even), all zeros for a row of zeros."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) * _STEP
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(x * inverse).clamp_(-127, 127).to(torch.int8)
    return q, scale.squeeze(-1)


def _i8_panels(matrix: torch.Tensor) -> torch.Tensor:
    """[out, in] -> per panel of PANEL outputs: [in / 4, PANEL, 4] int8 (each output's
    weights rounded with its own scale, `quantize_rows`; inputs 4i .. 4i + 3 side by side,
    zeros past the last input and output), then the PANEL scales (float32) and the PANEL
    sums of the output's int8 weights times 128 (int32), in an even number of panels;
    flattened and seen as float32 words (decode.c: I8_PANEL_BYTES)."""
    out, width = matrix.shape
    quads = -(-width // 4)
    padded = matrix.new_zeros(-(-out // (2 * PANEL)) * 2 * PANEL, 4 * quads)
    padded[:out, :width] = matrix
    q, scale = quantize_rows(padded)
    comp = (q.to(torch.int32).sum(dim=1) * 128).to(torch.int32)  # sum() gives int64
    weights = q.reshape(-1, PANEL, quads, 4).transpose(1, 2).reshape(-1, quads * 4 * PANEL)
    tails = (scale.reshape(-1, PANEL).view(torch.int8), comp.reshape(-1, PANEL).view(torch.int8))
    return torch.cat((weights, *tails), dim=1).reshape(-1).view(torch.float32)


@functools.cache
def bf16_weights() -> bool:
    """Whether the compiled step multiplies bfloat16 matrices (`pack(matrices="bfloat16")`): built
    for a CPU with AVX512-BF16, where that is twice the products per instruction of
    float32, from half the bytes."""
    library = _library()
    return library is not None and bool(library.lm_bf16_weights())


@functools.cache
def i8_weights() -> bool:
    """Whether the compiled step multiplies int8 matrices (`pack(matrices="int8")`): built
    for a CPU with AVX512-VNNI."""
    library = _library()
    return library is not None and bool(library.lm_i8_weights())


def decode_matrices(asked: str | None = None) -> str:
    """What a GPT's matrices are packed in for the native step, for `asked` (None: the
    `LM_DECODE_MATRICES` variable, else "auto"): "float32"; "bfloat16" or "int8" where the
    build multiplies them (`bf16_weights`, `i8_weights`; float32 where not); "auto":
    bfloat16 where `bf16_decode`, else float32."""
    asked = asked or os.environ.get("LM_DECODE_MATRICES") or "auto"
    if asked not in DECODE_MATRICES:
        raise LMError(
            f"LM_DECODE_MATRICES must be one of {', '.join(DECODE_MATRICES)}, got {asked!r}",
            param="decode_matrices",
        )
    if asked == "int8" and i8_weights():
        return "int8"
    if asked == "bfloat16" and bf16_weights():
        return "bfloat16"
    if asked == "auto" and bf16_decode():
        return "bfloat16"
    return "float32"


@functools.cache
def bf16_decode() -> bool:
    """Whether GPTs pack their matrices for the native step in bfloat16: where the build has
    them (`bf16_weights`), unless `LM_BF16_DECODE=0`. The step's sums stay float32; the
    weights and each product's inputs are rounded to bfloat16, as in the prefill's
    bfloat16 products (`LM_BF16_PREFILL`)."""
    if switched_off("LM_BF16_DECODE"):
        return False
    return bf16_weights()


DecodeStep = Callable[
    [PackedGPT, torch.Tensor, torch.Tensor, Sequence[torch.Tensor], Sequence[torch.Tensor]],
    torch.Tensor,
]


def _library() -> ctypes.CDLL | None:
    """decode.c built and loaded with its functions' signatures, or None (asked once by
    each of the cached functions below)."""
    library = load_library(SOURCE, "the GPT decode step")
    if library is None:
        return None
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    for name in _FUNCTIONS.values():
        function = getattr(library, name)
        function.argtypes = [pointer] * 6 + [i64, pointer, pointer, i64, pointer, ctypes.c_int]
        function.restype = ctypes.c_int
    for name in _GENERATE.values():
        function = getattr(library, name)
        function.argtypes = [pointer] * 4 + [i64, i64, i64, pointer, pointer, ctypes.c_float]
        function.argtypes += [pointer, pointer, ctypes.c_int]
        function.restype = i64
    library.lm_draw.argtypes = [pointer, i64, i64, pointer, pointer, pointer]
    library.lm_draw.restype = None
    for name in ("lm_bf16_weights", "lm_i8_weights"):
        getattr(library, name).argtypes = []
        getattr(library, name).restype = ctypes.c_int
    return library


@functools.cache  # GPT.step asks at every decode step: built once per process
def decode_step() -> DecodeStep | None:
    """The compiled whole-model decode step, or None where it cannot be built.

    The returned function takes a `PackedGPT`, `ids[B]` and `positions[B]` (contiguous
    int64 CPU tensors: each row's new token and where it goes) and the per-layer caches,
    keys and values `[*, H, T, D]` of one of `CACHE_DTYPES` (int8: `[*, H, T, D + 4]`,
    `lm.kv_int8`), contiguous rows
    whose first `B` are the batch. It writes each row's new keys and values at its position
    and returns the logits `[B, vocab]` in float32.
    """
    library = _library()
    if library is None:
        return None
    functions = {dtype: getattr(library, name) for dtype, name in _FUNCTIONS.items()}
    checked: dict = {}

    def step(packed, ids, positions, keys, values):
        batch = ids.shape[0]
        dtype, row_stride = _check(packed, ids, positions, keys, values, checked)
        logits = torch.empty(batch, int(packed.shape[4]))
        failed = functions[dtype](
            *_model_pointers(packed),
            ids.data_ptr(),
            positions.data_ptr(),
            batch,
            *_cache_pointers(keys, values),
            row_stride,
            logits.data_ptr(),
            torch.get_num_threads(),
        )
        _raise(failed, packed, positions)
        return logits

    return step


Generate = Callable[
    [PackedGPT, int, int, Sequence[torch.Tensor], Sequence[torch.Tensor], float, list[float]],
    list[int],
]


@functools.cache
def generate_step() -> Generate | None:
    """The compiled run of decode steps for one row, each step's token drawn as `draw`
    draws it and fed to the next, or None where it cannot be built.

    The returned function takes a `PackedGPT`, the row's next token and its position, the
    row's per-layer caches (`decode_step`'s layout, one row), a temperature (0: greedy)
    and one uniform number in [0, 1) per token to draw. It writes the fed tokens' keys and
    values and returns the drawn tokens: as many as uniforms, or fewer where a step's
    logits were not finite (the caller's per-step path then reports that step).
    """
    library = _library()
    if library is None:
        return None
    functions = {dtype: getattr(library, name) for dtype, name in _GENERATE.items()}

    def generate(packed, token, position, keys, values, temperature, uniform):
        count = len(uniform)
        positions = torch.tensor([position + count - 1])  # the last position written
        dtype, _ = _check(packed, torch.tensor([token]), positions, keys, values)
        draws = torch.tensor(uniform, dtype=torch.float64)
        out = torch.empty(count, dtype=torch.int64)
        done = functions[dtype](
            *_model_pointers(packed),
            token,
            position,
            count,
            *_cache_pointers(keys, values),
            temperature,
            draws.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if done < 0:
            _raise(-done, packed, positions)
        return out[:done].tolist()

    return generate


Draw = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@functools.cache
def draw() -> Draw | None:
    """The compiled sampler's last step, or None where it cannot be built: one token per
    row of float32 `logits[B, V]` (CPU) for `temperature[B]` (0: the first largest logit)
    and `uniform[B]` in [0, 1): the first token whose running sum of exp((logit - max) /
    temperature), in double, exceeds uniform times the whole sum. The engine's sampler and
    `generate_step` draw with the same code, so a seeded request gets the same tokens from
    either."""
    library = _library()
    if library is None:
        return None

    def sample(logits, temperature, uniform):
        logits = logits.float().contiguous()
        rows, vocab = logits.shape
        temperature = temperature.float().contiguous()
        uniform = uniform.double().contiguous()
        if temperature.shape != (rows,) or uniform.shape != (rows,):
            raise ValueError("one temperature and one uniform number per row")
        out = torch.empty(rows, dtype=torch.int64)
        library.lm_draw(
            logits.data_ptr(),
            rows,
            vocab,
            temperature.data_ptr(),
            uniform.data_ptr(),
            out.data_ptr(),
        )
        return out

    return sample


def _model_pointers(packed: PackedGPT) -> tuple[int, int, int, int]:
    """The first four arguments of decode.c's steps: shape, numbers, weights, offsets."""
    return (
        packed.shape.data_ptr(),
        packed.numbers.data_ptr(),
        packed.weights.data_ptr(),
        packed.offsets.data_ptr(),
    )


def _cache_pointers(keys, values) -> tuple[ctypes.Array, ctypes.Array]:
    """The per-layer key and value caches as C arrays of pointers."""
    array = ctypes.c_void_p * len(keys)
    return array(*(k.data_ptr() for k in keys)), array(*(v.data_ptr() for v in values))


def _raise(failed: int, packed: PackedGPT, positions: torch.Tensor) -> None:
    """The C step's error codes, as exceptions."""
    if failed == 1:
        raise MemoryError("the native decode step could not allocate its scratch")
    if failed == 2:
        raise IndexError(f"token ids must lie in [0, {int(packed.shape[4])})")
    if failed == 3:
        raise ValueError(
            f"state of {int(positions.max()) + 1} tokens exceeds block size {int(packed.shape[5])}"
        )
    if failed == 4:
        raise ValueError("this build of the native step has no bfloat16 matrices (bf16_weights)")
    if failed == 5:
        raise ValueError("this build of the native step has no int8 matrices (i8_weights)")


def _check(
    packed: PackedGPT, ids, positions, keys, values, checked: dict | None = None
) -> tuple[torch.dtype, int]:
    """The step reads raw memory: refuse anything but the layouts it was written for.
    Returns the caches' dtype and row stride. `checked` remembers caches found valid, by
    their addresses and layouts (a decode loop passes the same ones at every step)."""
    batch = ids.shape[0]
    for name, t in (("ids", ids), ("positions", positions)):
        if (
            t.dtype != torch.int64
            or t.shape != (batch,)
            or not t.is_contiguous()
            or t.device.type != "cpu"
        ):
            raise ValueError(f"{name} must be a contiguous int64 CPU tensor, one entry per row")
    if checked is None:
        return _check_caches(packed, batch, keys, values)
    layout = (batch, *((t.data_ptr(), t.shape, t.stride(), t.dtype, t.is_cpu) for t in keys))
    layout += tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.is_cpu) for t in values)
    seen = checked.get(layout)
    if seen is not None and seen[0] is packed:
        return seen[1]
    result = _check_caches(packed, batch, keys, values)
    if len(checked) >= 64:
        checked.clear()
    checked[layout] = (packed, result)
    return result


def _check_caches(packed: PackedGPT, batch: int, keys, values) -> tuple[torch.dtype, int]:
    n_layer, n_embd, heads = (int(n) for n in packed.shape[:3])
    dim, ctx = n_embd // heads, int(packed.shape[5])
    if len(keys) != n_layer or len(values) != n_layer:
        raise ValueError(f"the caches must hold {n_layer} layers")
    dtype, row_stride = keys[0].dtype, keys[0].stride(0)
    if dtype not in CACHE_DTYPES:
        raise ValueError(
            f"the native decode step takes a cache of {', '.join(map(str, CACHE_DTYPES))}"
        )
    vector = kv_int8.width(dim, dtype)
    strides = (row_stride, ctx * vector, vector, 1)
    for k, v in zip(keys, values):
        if (
            k.dtype != dtype
            or v.dtype != dtype
            or k.shape[0] < batch
            or v.shape[0] < batch
            or k.shape[1:] != (heads, ctx, vector)
            or v.shape[1:] != (heads, ctx, vector)
            or k.stride() != strides
            or v.stride() != strides
            or k.device.type != "cpu"
            or v.device.type != "cpu"
        ):
            raise ValueError(
                "KV caches must be CPU tensors of one dtype with contiguous [H, T, D] keys "
                "and values, rows equally far apart"
            )
    return dtype, row_stride
