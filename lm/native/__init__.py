"""Native CPU kernels, compiled from C on first use with the machine's C compiler.

Decode attention (`attention.c`) is the one hot loop PyTorch has no fused CPU kernel for:
one query per row over a cache whose rows hold different lengths; `decode.c` is a whole
GPT decode step around it (`lm.native.decode`). Each shared library is built once per
source, compiler and CPU into a cache directory (`LM_CACHE_DIR`, else
`$XDG_CACHE_HOME/lm`, else `~/.cache/lm`) and loaded with ctypes. Without a compiler, or
with `LM_NATIVE=0`, `decode_attention()` returns None and the models use their PyTorch
path, which computes the same thing more slowly. `bf16_matmul_is_fast()` tells whether the
CPU multiplies bfloat16 in hardware (the GPT's long prefills then use it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lm import kv_int8

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention.c")
# -ffast-math lets the compiler vectorise expf; it is given to the compile step only, so
# that linking does not add crtfastmath.o (which would flush denormals process-wide).
COMPILE_FLAGS = ["-O3", "-ffast-math", "-fPIC", "-std=c11"]
OPENMP_FLAG = "-fopenmp"  # the kernel's threads; without it, it runs in one thread
# A compile is a few CPU seconds, but minutes of wall time on a machine busy training.
COMPILE_TIMEOUT_S = 600


def cache_dir() -> Path:
    if os.environ.get("LM_CACHE_DIR"):
        return Path(os.environ["LM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lm"


def _cpu_signature() -> str:
    """The CPU's model and features: -march=native code must not run on another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keys = ("model name", "flags", "Features", "CPU part")
        return "\n".join(sorted({line for line in lines if line.startswith(keys)}))
    except OSError:
        return platform.processor() or platform.machine()


def _arch_flag() -> str:
    """-march for the kernels: this machine's CPU, or `LM_NATIVE_ARCH` (the tests build the
    AVX2 and AVX-512 code paths for an older CPU than the one they run on)."""
    return f"-march={os.environ.get('LM_NATIVE_ARCH') or 'native'}"


def _compile(compiler: str, source: Path, target: Path) -> None:
    """Compile `source` into the shared library `target` (written atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / f"{source.stem}.o", Path(tmp) / target.name
        errors = []
        for openmp in ([OPENMP_FLAG], []):
            flags = [*COMPILE_FLAGS, _arch_flag(), *openmp]
            compile_cmd = [compiler, *flags, "-c", str(source), "-o", str(obj)]
            link_cmd = [compiler, "-shared", *openmp, str(obj), "-o", str(lib), "-lm"]
            try:
                for cmd in (compile_cmd, link_cmd):
                    subprocess.run(
                        cmd, check=True, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
                    )
                os.replace(lib, target)
                return
            except subprocess.CalledProcessError as err:
                errors.append(err.stderr.strip() or str(err))
            except (OSError, subprocess.TimeoutExpired) as err:
                errors.append(str(err))
        raise RuntimeError("; ".join(errors))


def switched_off(name: str) -> bool:
    """Whether the environment variable `name` (an on/off switch, on when unset) says off."""
    return os.environ.get(name, "1").lower() in ("0", "false", "no", "off")


@functools.cache
def bf16_matmul_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (x86 AVX512-BF16 or AMX),
    where they run several times faster than float32; elsewhere bfloat16 is emulated.
    `LM_BF16_PREFILL=0` answers no."""
    if switched_off("LM_BF16_PREFILL"):
        return False
    flags = _cpu_signature().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


_FUNCTIONS = {
    torch.float32: "lm_decode_attention_f32",
    torch.float16: "lm_decode_attention_f16",
    torch.bfloat16: "lm_decode_attention_bf16",
    torch.int8: "lm_decode_attention_i8",  # lm/kv_int8.py: int8 numbers, a scale a vector
}
CACHE_DTYPES = tuple(_FUNCTIONS)  # what the kernel's KV cache may hold


def native_off() -> bool:
    """Whether `LM_NATIVE` turns the compiled kernels off."""
    return switched_off("LM_NATIVE")


def load_library(source: Path, purpose: str) -> ctypes.CDLL | None:
    """Build `source` (once per sources, compiler and CPU) and load it, or None where it
    cannot be built; `purpose` names what then runs on the PyTorch path, for the log."""
    if native_off():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning(
            "no C compiler found: %s runs on the slower PyTorch path (install gcc or "
            "clang, or set CC)",
            purpose,
        )
        return None
    key = hashlib.sha256(
        "\0".join(
            [
                *(path.read_text() for path in _sources(source)),
                compiler,
                *COMPILE_FLAGS,
                _arch_flag(),
                OPENMP_FLAG,
                _cpu_signature(),
            ]
        ).encode()
    ).hexdigest()[:16]
    target = cache_dir() / "native" / f"{source.stem}-{key}.so"
    try:
        if not target.exists():
            _compile(compiler, source, target)
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as err:
        logger.warning(
            "could not build the native kernel %s with %s (%s): %s runs on the slower PyTorch path",
            source.name,
            compiler,
            err,
            purpose,
        )
        return None


def _sources(source: Path) -> list[Path]:
    """`source` and the files it includes with `#include "..."` (the library's key)."""
    included = re.findall(r'^#include "([^"]+)"', source.read_text(), flags=re.MULTILINE)
    return [source, *(source.with_name(name) for name in included)]


def _library() -> ctypes.CDLL | None:
    """The decode-attention library with its functions' signatures, or None."""
    library = load_library(SOURCE, "decode attention")
    if library is None:
        return None
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    for function in _FUNCTIONS.values():
        function = getattr(library, function)
        function.argtypes = [
            pointer,
            i64,
            pointer,
            pointer,
            i64,
            pointer,
            pointer,
            i64,
            pointer,
            pointer,
            i64,
            i64,
            i64,
            i64,
            ctypes.c_float,
            ctypes.c_int,
        ]
        function.restype = ctypes.c_int
    return library


DecodeAttention = Callable[..., torch.Tensor]


@functools.cache  # GPT.step asks at every step: the answer is built once per process
def decode_attention() -> DecodeAttention | None:
    """The native decode-attention kernel, or None where it cannot be built.

    The returned function takes `qkv[B, 3*H*D]` (the new tokens' fused float32
    projections), a layer's cache (`lm.models.gpt.LayerCache`: keys and values
    `[*, H, T, D]`, or `[*, H, T, D + 4]` int8 (`lm.kv_int8`), CPU tensors of one of
    `CACHE_DTYPES` whose first `B` rows are the batch), `positions[B]` (int64), the softmax
    scale and, when the caller knows them, the positions' (min, max). It writes each row's
    new key and value at its position (rounded to the cache's dtype as `Tensor.to` rounds,
    or quantized as `lm.kv_int8.quantize` does) and returns the attention output `[B, H*D]`
    in float32.
    """
    library = _library()
    if library is None:
        return None
    functions = {dtype: getattr(library, name) for dtype, name in _FUNCTIONS.items()}

    def attend(qkv, cache, positions, scale, bounds=None):
        batch = qkv.shape[0]
        _, heads, ctx, vector = cache.keys.shape
        dim = vector - kv_int8.SCALE_BYTES if cache.keys.dtype == torch.int8 else vector
        _check(qkv, cache, positions, batch, heads, dim, ctx)
        if batch:
            first, last = bounds or (int(positions.min()), int(positions.max()))
            if not 0 <= first <= last < ctx:
                raise ValueError(f"positions must lie in [0, {ctx})")
        width, dtype = heads * dim, cache.keys.dtype
        new = qkv[:, width:]  # the new keys and values
        if dtype == torch.int8:  # [B, 2 * H * (D + 4)]
            new = kv_int8.quantize(new.reshape(batch, 2 * heads, dim))
            new = new.view(batch, 2 * heads * vector)
        elif dtype != torch.float32:  # rounded once, as the cache will hold them
            new = new.to(dtype)
        out = torch.empty(batch, width)
        failed = functions[dtype](
            qkv.data_ptr(),
            qkv.stride(0),
            new.data_ptr(),
            new.data_ptr() + heads * vector * new.element_size(),
            new.stride(0),
            cache.keys.data_ptr(),
            cache.values.data_ptr(),
            cache.keys.stride(0),
            positions.data_ptr(),
            out.data_ptr(),
            batch,
            heads,
            dim,
            ctx,
            scale,
            torch.get_num_threads(),
        )
        if failed:
            raise MemoryError("native decode attention could not allocate its scratch")
        return out

    return attend


def _check(qkv, cache, positions, batch, heads, dim, ctx) -> None:
    """The kernel reads raw memory: refuse anything but the layouts it was written for."""
    keys, values = cache.keys, cache.values
    if not all(t.device.type == "cpu" for t in (qkv, keys, values, positions)):
        raise ValueError("native decode attention takes CPU tensors")
    if qkv.dtype != torch.float32 or keys.dtype not in CACHE_DTYPES:
        raise ValueError(
            f"native decode attention takes float32 projections and a cache "
            f"of {', '.join(str(d) for d in CACHE_DTYPES)}"
        )
    if qkv.shape[1:] != (3 * heads * dim,) or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [batch, {3 * heads * dim}] with unit inner stride")
    if values.dtype != keys.dtype:
        raise ValueError("the key and value caches must share a dtype")
    vector = kv_int8.width(dim, keys.dtype)
    if (
        keys.shape[0] < batch
        or values.shape != (keys.shape[0], heads, ctx, vector)
        or keys.shape[1:] != (heads, ctx, vector)
        or keys.stride()[1:] != (ctx * vector, vector, 1)
        or values.stride()[1:] != (ctx * vector, vector, 1)
        or values.stride(0) != keys.stride(0)
    ):
        raise ValueError("KV cache rows must be contiguous [H, T, D] keys and values")
    if (
        positions.dtype != torch.int64
        or positions.shape != (batch,)
        or not positions.is_contiguous()
    ):
        raise ValueError("positions must be a contiguous int64 tensor of one entry per row")
