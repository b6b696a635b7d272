"""Dropout whose mask is a hash of the element's index and a seed (lm/native/dropout.c).

`Dropout` is `nn.Dropout` for the models: on CPU float32 tensors it runs the compiled
kernel (about 15x faster than PyTorch's Bernoulli draws here, and no mask is kept for the
backward pass: it is regenerated from the seed), elsewhere - CUDA, bfloat16 autocast, no C
compiler, `LM_NATIVE=0` - `torch.nn.functional.dropout`. The seed is drawn from torch's
global generator, so a seeded (or resumed) run draws the same masks again.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lm.native import load_library

SOURCE = Path(__file__).with_name("dropout.c")
MAX_ELEMENTS = 2**32  # the kernel hashes 32-bit indices


@torch.compiler.assume_constant_result  # torch.compile: a constant, not traced
def native() -> bool:
    """Whether the compiled kernel is available here."""
    return _kernel() is not None


@functools.cache
def _kernel():
    """The compiled `lm_dropout_f32`, or None where it cannot be built."""
    library = load_library(SOURCE, "dropout")
    if library is None:
        return None
    function = library.lm_dropout_f32
    function.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_uint64,
        ctypes.c_uint32,
        ctypes.c_float,
        ctypes.c_int,
    ]
    function.restype = None
    return function


def _apply(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    threshold = min(round(p * 2**32), 2**32 - 1)
    _kernel()(
        x.data_ptr(), y.data_ptr(), x.numel(), seed, threshold, 1.0 / (1.0 - p),
        torch.get_num_threads(),
    )  # fmt: skip
    return y


# An operator of its own (not an autograd.Function) so that torch.compile keeps it whole in
# its graph instead of breaking the graph around a ctypes call. The seed travels as a
# tensor: drawn inside a compiled graph, a Python int would break it too.
@torch.library.custom_op("lm::hash_dropout", mutates_args=())
def hash_dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return _apply(x, p, int(seed))


@hash_dropout.register_fake
def _(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _setup(ctx, inputs, output) -> None:
    _, ctx.p, ctx.seed = inputs


def _backward(ctx, grad: torch.Tensor):
    return hash_dropout(grad, ctx.p, ctx.seed), None, None


hash_dropout.register_autograd(_backward, setup_context=_setup)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, on the compiled kernel where it applies."""
    if not training or p == 0.0:
        return x
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() < MAX_ELEMENTS
        and 0.0 < p < 1.0
        and native()
    ):
        seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
        return hash_dropout(x, p, seed)
    return F.dropout(x, p, training)


class Dropout(nn.Module):
    """`nn.Dropout` (same attribute `p`, no parameters) over `dropout` above."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
