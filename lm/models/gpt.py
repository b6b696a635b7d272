"""Decoder-only transformer (GPT) with a KV cache for generation.

Pre-LayerNorm blocks of causal multi-head self-attention and an MLP, learned positional
embeddings, a final LayerNorm and an output layer tied to the token embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lm.models import ModelConfig, State
from lm.native import CACHE_DTYPES, DecodeAttention, bf16_matmul_is_fast, decode_attention

BF16_PREFILL_BLOCK = 512  # prefills of this many tokens or more: bfloat16 matrix products


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, time, _ = x.shape
        q, k, v = self.c_attn(x).view(batch, time, 3, self.n_head, self.head_dim).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        batch, _, time, _ = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(batch, time, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self._merge(y)

    def step(self, x: torch.Tensor, cache: LayerCache, where: StepIndex) -> torch.Tensor:
        """Attend new tokens `x[B,t]` over the cache, writing their keys and values into it.

        Keys are cached transposed, [B, H, D, T], and values as [B, H, T, D]: both products
        are then plain batched matrix products over contiguous runs of the cache. The cache
        may hold a narrower dtype than the model (half the bytes for every decode step to
        read); the products and softmax run in the model's dtype. Decode steps on the CPU
        go to the compiled kernel (`lm.native`), which computes the same per row.
        """
        batch, time, _ = x.shape
        qkv = _linear(x, self.c_attn.weight, self.c_attn.bias, where)
        scale = 1.0 / math.sqrt(self.head_dim)
        if where.native is not None:
            y = where.native(qkv.view(batch, -1), cache, where.positions.view(-1), scale,
                             (where.first, where.length - 1))
            return F.linear(y.view(batch, 1, -1), self.c_proj.weight, self.c_proj.bias)
        q, k, v = qkv.view(batch, time, 3, self.n_head, self.head_dim).transpose(1, 3).unbind(2)
        # Both caches seen as [B, T, H, D], the new keys and values as [B, t, H, D].
        _store(cache.keys.permute(0, 3, 1, 2), k.transpose(1, 2), where)
        _store(cache.values.transpose(1, 2), v.transpose(1, 2), where)
        if where.same_position == 0 and time > 1:  # a prefill of empty rows, as in `forward`
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return _linear(y.transpose(1, 2).reshape(batch, time, -1), self.c_proj.weight,
                           self.c_proj.bias, where)
        keys = cache.keys[..., : where.length].to(x.dtype)
        values = cache.values[:, :, : where.length].to(x.dtype)
        # Explicit attention: for a handful of query tokens it is several times faster on
        # the CPU than the fused kernel, which is built for long queries.
        scores = (q * scale) @ keys
        if where.bias is not None:
            scores = scores + where.bias
        y = (torch.softmax(scores, dim=-1) @ values).transpose(1, 2).reshape(batch, time, -1)
        return _linear(y, self.c_proj.weight, self.c_proj.bias, where)


def _store(target: torch.Tensor, new: torch.Tensor, where: StepIndex) -> None:
    """Write `new[B, t, ...]` into `target[B, T, ...]` at each row's new positions."""
    if where.same_position is not None:  # every row at one position: a plain slice copy
        target[:, where.same_position : where.same_position + new.shape[1]] = new
    else:
        target[where.rows, where.positions] = new.to(target.dtype)


class LayerCache(NamedTuple):
    """One layer's part of the state: keys [B, H, D, T] (transposed) and values [B, H, T, D]."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class StepIndex:
    """Where a step's new tokens go in the cache, computed once per step for all layers."""

    positions: torch.Tensor  # [B, t]
    rows: torch.Tensor  # [B, 1]
    first: int  # the lowest start position
    length: int  # keys to attend over: the highest position + 1
    same_position: int | None  # the shared start position when every row has the same one
    bias: torch.Tensor | None  # [B, 1, t, L] of zeros and -inf where a query may not see a key
    native: DecodeAttention | None = None  # the compiled kernel, for steps it can do
    bf16_prefill: bool = False  # matrix products in bfloat16 (see `_linear`)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def step(self, x, cache: LayerCache, where: StepIndex) -> torch.Tensor:
        """Generation: the same computation as `forward`, called functionally (no dropout,
        no module-call overhead) because decode runs it for every token."""
        x = x + self.attn.step(_layer_norm(x, self.ln_1), cache, where)
        mlp = self.mlp
        h = F.gelu(_linear(_layer_norm(x, self.ln_2), mlp.c_fc.weight, mlp.c_fc.bias, where))
        return x + _linear(h, mlp.c_proj.weight, mlp.c_proj.bias, where)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            where: StepIndex) -> torch.Tensor:
    """`F.linear`; in a long prefill on the CPU, in bfloat16 with float32 results.

    A prefill's matrix products are large enough for the CPU's bfloat16 dot-product
    instructions to pay: several times faster than float32 on thousands of tokens, while
    the validation loss of decoding after such a prefill moves by 0.00003 nats or less on
    the shipped GPTs (`python -m bench.precision_bench`). The token count is padded to a
    multiple of BF16_PREFILL_BLOCK, so that oneDNN builds a kernel for a few shapes only
    (it keeps one per shape). Decode steps stay in float32, however many rows.
    """
    if not where.bf16_prefill:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    padded = -len(rows) % BF16_PREFILL_BLOCK
    rows = F.pad(rows.to(torch.bfloat16), (0, 0, 0, padded))
    y = F.linear(rows, weight.to(torch.bfloat16), None if bias is None else bias.to(torch.bfloat16))
    return y[: len(y) - padded].float().view(*x.shape[:-1], -1)


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.context_size = config.block_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):  # scaled init of residual projections (GPT-2)
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Parameters, counting the tied embedding once and excluding positions."""
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        time = ids.shape[1]
        if time > self.config.block_size:
            raise ValueError(f"sequence of {time} tokens exceeds block size {self.config.block_size}")
        positions = torch.arange(time, device=ids.device)
        x = self.drop(self.wte(ids) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(ids))

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   cache_dtype: torch.dtype | None = None) -> State:
        """Empty state for `batch_size` rows: positions and a KV cache per layer (in
        `cache_dtype`, by default the model's)."""
        c = self.config
        device = device or self.wte.weight.device
        dtype = cache_dtype or self.wte.weight.dtype
        head_dim = c.n_embd // c.n_head
        state = {"pos": torch.zeros(batch_size, dtype=torch.long, device=device)}
        for layer in range(c.n_layer):  # keys [B, H, D, T], values [B, H, T, D]
            state[f"k{layer}"] = torch.zeros((batch_size, c.n_head, head_dim, c.block_size),
                                             device=device, dtype=dtype)
            state[f"v{layer}"] = torch.zeros((batch_size, c.n_head, c.block_size, head_dim),
                                             device=device, dtype=dtype)
        return state

    def step(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Consume `ids[B,t]` after what `state` holds; return next-token logits[B,V].

        The KV cache is written in place; rows may be at different positions.
        """
        batch, time = ids.shape
        pos = state["pos"]
        first, last = int(pos.min()), int(pos.max())
        length = last + time
        if length > self.config.block_size:
            raise ValueError(f"state of {length} tokens exceeds block size {self.config.block_size}")
        positions = pos[:, None] + torch.arange(time, device=ids.device)  # [B, t]
        native = None
        if (time == 1 and ids.device.type == "cpu" and not torch.is_grad_enabled()
                and self.wte.weight.dtype == torch.float32 and state["k0"].dtype in CACHE_DTYPES):
            native = decode_attention()
        bias = None  # the attention mask, where rows or queries see different keys
        fresh = time > 1 and first == last == 0  # a prefill of empty rows: causal attention
        if native is None and not fresh and (first != last or time > 1):
            keys = torch.arange(length, device=ids.device)
            blocked = (keys[None, None, :] > positions[:, :, None]).unsqueeze(1)
            bias = torch.zeros(blocked.shape, device=ids.device, dtype=self.wte.weight.dtype)
            bias.masked_fill_(blocked, -math.inf)
        bf16_prefill = (time > 1 and batch * time >= BF16_PREFILL_BLOCK
                        and ids.device.type == "cpu" and self.wte.weight.dtype == torch.float32
                        and bf16_matmul_is_fast())
        where = StepIndex(positions=positions, rows=torch.arange(batch, device=ids.device)[:, None],
                          first=first, length=length,
                          same_position=first if first == last else None, bias=bias,
                          native=native, bf16_prefill=bf16_prefill)
        x = self.wte(ids) + self.wpe(positions)
        for layer, block in enumerate(self.blocks):
            x = block.step(x, LayerCache(state[f"k{layer}"], state[f"v{layer}"]), where)
        logits = F.linear(_layer_norm(x[:, -1], self.ln_f), self.lm_head.weight)
        return logits, {**state, "pos": pos + time}
