"""The int8 KV cache: each head's key or value vector as int8 numbers and one float32 scale.

A cached vector of `D` numbers is stored as `D + 4` bytes: `x / scale` rounded to int8, then
the scale, `max(|x|) / 127`, as a float32's four bytes (llama.cpp's q8_0 keeps a 16-bit scale
for each block of 32). The cache tensor is int8 `[rows, H, T, D + 4]`: every layout operation
on a cache (rows moved, prefixes copied, the prefix cache's blocks) works on it unchanged,
and a decode step reads 36 bytes a vector of 32 where bfloat16 takes 64. The native decode
step (`lm/native/decode.c`, `store`) quantizes byte for byte as `quantize` does; the attention
kernel alone (`lm.native.decode_attention`) is given keys and values quantized here; the
PyTorch path dequantizes on read.
"""

from __future__ import annotations

import torch

SCALE_BYTES = 4  # a float32 scale after each vector's int8 numbers
_STEP = 1.0 / 127.0  # rounded to float32 where used, as the C code rounds its constant


def width(head_dim: int, dtype: torch.dtype) -> int:
    """The last dimension of a cache of `dtype` for heads of `head_dim`."""
    return head_dim + SCALE_BYTES if dtype == torch.int8 else head_dim


def quantize(x: torch.Tensor) -> torch.Tensor:
    """`x[..., D]` (float) as int8 `[..., D + 4]`: the rounded numbers, then the scale.

    scale = max|x| * (1/127), in float32; q = round(x * (1 / scale)) (halves to even), 0 where
    the vector is all zeros. The C kernels compute the same products in the same order."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = amax * torch.tensor(_STEP, dtype=torch.float32)
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(x * inverse).clamp_(-127, 127).to(torch.int8)
    scale_bytes = scale.reshape(-1).view(torch.int8).view(*x.shape[:-1], SCALE_BYTES)
    return torch.cat((q, scale_bytes), dim=-1)


def dequantize(cache: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 `[..., D + 4]` back to `dtype` `[..., D]`: each number times its vector's scale."""
    q, scale_bytes = cache[..., :-SCALE_BYTES], cache[..., -SCALE_BYTES:]
    scale = scale_bytes.reshape(-1, SCALE_BYTES).clone().view(torch.float32)  # aligned
    scale = scale.view(*cache.shape[:-1], 1)
    return (q.float() * scale).to(dtype)
