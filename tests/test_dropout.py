"""The hashed dropout kernel (lm/native/dropout.c): dropout's contract, its own backward,
seeded masks, the PyTorch fallbacks, and a graph torch.compile keeps whole."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from lm.native import dropout as hashed
from lm.native.dropout import Dropout, dropout

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="no C compiler on this machine",
)


@pytest.fixture(autouse=True)
def fresh_kernel(monkeypatch):
    """Each test loads (or is refused) the kernel under its own environment; the library is
    built once into the cache directory (as test_native's kernel tests do)."""
    monkeypatch.delenv("LM_NATIVE", raising=False)
    hashed._kernel.cache_clear()
    yield
    hashed._kernel.cache_clear()


def nonzero_input(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator) + 0.5  # no zeros: a zero marks a drop


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_drops_a_fraction_p_and_scales_the_rest(p):
    assert hashed.native()
    x = nonzero_input(64, 1024)
    torch.manual_seed(0)
    y = dropout(x, p)
    dropped = (y == 0).float().mean().item()
    n = x.numel()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)  # five standard deviations
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * torch.tensor(1 / (1 - p)))


def test_the_backward_pass_applies_the_forward_mask():
    x = nonzero_input(8, 256, 48).requires_grad_()
    torch.manual_seed(1)
    y = dropout(x, 0.2)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    expected = torch.where(y != 0, weights * torch.tensor(1 / 0.8), torch.zeros(()))
    assert torch.equal(x.grad, expected)


def test_masks_follow_torchs_seed_and_not_the_thread_count():
    x = nonzero_input(1 << 17)  # large enough for the kernel to use threads
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(3)
        torch.set_num_threads(1)
        one = dropout(x, 0.3)
        torch.manual_seed(3)
        torch.set_num_threads(2)
        two = dropout(x, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.manual_seed(4)
    assert not torch.equal(dropout(x, 0.3), one)
    assert not torch.equal(dropout(x, 0.3), dropout(x, 0.3))  # a fresh mask each call


def test_neighbouring_elements_are_not_correlated():
    torch.manual_seed(5)
    dropped = (dropout(torch.ones(1 << 20), 0.5) == 0).float()
    corr = torch.corrcoef(torch.stack([dropped[:-1], dropped[1:]]))[0, 1].item()
    assert abs(corr) < 0.01


def test_eval_mode_and_p_zero_return_the_input():
    x = nonzero_input(10)
    module = Dropout(0.5).eval()
    assert module(x) is x
    assert dropout(x, 0.0) is x
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)


def test_what_the_kernel_does_not_take_goes_to_pytorch(monkeypatch):
    calls = []
    real = F.dropout
    monkeypatch.setattr(hashed.F, "dropout", lambda *a: calls.append(a) or real(*a))
    y = dropout(nonzero_input(100).bfloat16(), 0.5)
    assert y.dtype == torch.bfloat16 and len(calls) == 1
    dropout(nonzero_input(100), 0.5)  # float32 on the CPU: the kernel
    assert len(calls) == 1
    monkeypatch.setenv("LM_NATIVE", "0")
    hashed._kernel.cache_clear()
    assert not hashed.native()
    dropout(nonzero_input(100), 0.5)
    assert len(calls) == 2


def test_torch_compile_keeps_the_graph_whole():
    module = torch.nn.Sequential(torch.nn.Linear(16, 16), Dropout(0.1), torch.nn.Linear(16, 4))
    explained = torch._dynamo.explain(module)(nonzero_input(8, 16))
    assert explained.graph_break_count == 0
    assert explained.graph_count == 1
