"""Decoder-only transformer (GPT) with a KV cache for generation.

Pre-norm blocks of causal multi-head self-attention and an MLP, a final norm and an output
layer. The classic GPT-2 block (learned positions, LayerNorm, GELU MLP, output tied to the
token embedding) is the default; `ModelConfig` switches on the modern parts one by one:
rotary positions, RMSNorm, QK-norm, SwiGLU or ReLU-squared MLPs, an untied output layer,
zero-initialised output projections and logit soft-capping.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lm import kv_int8
from lm.lora import MultiLoRALinear
from lm.models import ModelConfig, State
from lm.native import CACHE_DTYPES, DecodeAttention, bf16_matmul_is_fast, decode_attention
from lm.native.decode import PackedGPT, decode_matrices, decode_step, generate_step, pack
from lm.native.dropout import Dropout

# A prefill of this many tokens per row or more multiplies in bfloat16 (on CPUs that do it
# in hardware). Decided by the tokens per row, not by the batch: a row's numbers do not
# depend on what it is batched with (the engine keeps shorter rows in their own batches).
BF16_PREFILL_TOKENS = 64
BF16_PREFILL_BLOCK = 512  # bfloat16 products' rows are padded to a multiple of this
RMS_NORM_EPS = 1e-6  # as Qwen3 and Llama

Rotary = tuple[torch.Tensor, torch.Tensor]  # cos and sin, [..., t, 1, head_dim]


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> Rotary:
    """Cos and sin of each position's rotation angles, as transformers' Llama/Qwen3 compute
    them (float32; the frequencies repeated for the two halves of each head)."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.float()[..., None] * inv_freq  # [..., t, D/2]
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(-2)  # [..., t, 1, D]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate `x[B, t, H, D]` by its positions' angles (HF/NeoX rotate-half convention)."""
    cos, sin = (table.to(x.dtype) for table in rotary)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def make_norm(config: ModelConfig, size: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(size, eps=RMS_NORM_EPS)
    return nn.LayerNorm(size, bias=config.bias)


def mlp_width(config: ModelConfig) -> int:
    """Hidden width of the MLP: 4x, or for SwiGLU 8/3x rounded up to a multiple of 32 (the
    same parameter count as a 4x two-matrix MLP)."""
    if config.mlp_hidden is not None:
        return config.mlp_hidden
    if config.mlp == "swiglu":
        return -(-8 * config.n_embd // 3 // 32) * 32
    return 4 * config.n_embd


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout if config.attn_dropout is None else config.attn_dropout
        self.resid_dropout = Dropout(config.dropout)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=RMS_NORM_EPS) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=RMS_NORM_EPS) if config.qk_norm else None

    def _position(self, qkv: torch.Tensor, rotary: Rotary | None) -> torch.Tensor:
        """QK-norm, then rotary positions, on the queries and keys of `qkv[B, t, 3, H, D]`."""
        if self.q_norm is None and rotary is None:
            return qkv
        q, k, v = qkv.unbind(2)
        if self.q_norm is not None:
            q, k = _norm(q, self.q_norm), _norm(k, self.k_norm)
        if rotary is not None:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        return torch.stack((q, k, v), dim=2)

    def _heads(
        self, x: torch.Tensor, rotary: Rotary | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, time, _ = x.shape
        qkv = self.c_attn(x).view(batch, time, 3, self.n_head, self.head_dim)
        q, k, v = self._position(qkv, rotary).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        batch, _, time, _ = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(batch, time, -1)))

    def forward(self, x: torch.Tensor, rotary: Rotary | None = None) -> torch.Tensor:
        q, k, v = self._heads(x, rotary)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self._merge(y)

    def step(self, x: torch.Tensor, cache: LayerCache, where: StepIndex) -> torch.Tensor:
        """Attend new tokens `x[B,t]` over the cache, writing their keys and values into it.

        Keys and values are cached as [B, H, T, D]: a row's keys of one head are one
        contiguous run, read front to back (by the native kernel: the layout decides how
        fast a long cache streams from memory). The cache
        may hold a narrower dtype than the model (half the bytes for every decode step to
        read); the products and softmax run in the model's dtype. Decode steps on the CPU
        go to the compiled kernel (`lm.native`), which computes the same per row.
        """
        batch, time, _ = x.shape
        qkv = _project(self.c_attn, x, where)
        if self.q_norm is not None or where.rotary is not None:  # before the cache and kernel
            qkv = self._position(
                qkv.view(batch, time, 3, self.n_head, self.head_dim), where.rotary
            ).reshape(batch, time, -1)
        scale = 1.0 / math.sqrt(self.head_dim)
        if where.native is not None:
            y = where.native(
                qkv.view(batch, -1),
                cache,
                where.positions.view(-1),
                scale,
                (where.first, where.length - 1),
            )
            return _project(self.c_proj, y.view(batch, 1, -1), where)
        q, k, v = qkv.view(batch, time, 3, self.n_head, self.head_dim).transpose(1, 3).unbind(2)
        # Both caches seen as [B, T, H, D], the new keys and values as [B, t, H, D].
        _store(cache.keys.transpose(1, 2), k.transpose(1, 2), where)
        _store(cache.values.transpose(1, 2), v.transpose(1, 2), where)
        if where.same_position == 0 and time > 1:  # a prefill of empty rows, as in `forward`
            if cache.keys.dtype != k.dtype:  # the keys and values as later steps see them
                k = _read(cache.keys[:, :, :time], k.dtype)
                v = _read(cache.values[:, :, :time], v.dtype)
            if where.ends is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # rows padded at their end: each group over its own length (the padding's
                y = torch.zeros_like(q)  # outputs are never read)
                for end, rows in where.ends.items():
                    y[rows, :, :end] = F.scaled_dot_product_attention(
                        q[rows, :, :end], k[rows, :, :end], v[rows, :, :end], is_causal=True
                    )
            return _project(self.c_proj, y.transpose(1, 2).reshape(batch, time, -1), where)
        keys = _read(cache.keys[:, :, : where.length], x.dtype).transpose(-1, -2)
        values = _read(cache.values[:, :, : where.length], x.dtype)
        # Explicit attention: for a handful of query tokens it is several times faster on
        # the CPU than the fused kernel, which is built for long queries. (Its numbers for a
        # row do not depend on how many masked keys follow, unlike the fused kernel's: no
        # grouping by length here; tests/test_engine.py checks it with a cached prefix.)
        scores = (q * scale) @ keys
        if where.bias is not None:
            scores = scores + where.bias
        y = (torch.softmax(scores, dim=-1) @ values).transpose(1, 2).reshape(batch, time, -1)
        return _project(self.c_proj, y, where)


def _store(target: torch.Tensor, new: torch.Tensor, where: StepIndex) -> None:
    """Write `new[B, t, ...]` into `target[B, T, ...]` at each row's new positions (an
    int8 cache's quantized, `lm.kv_int8`)."""
    if target.dtype == torch.int8:
        new = kv_int8.quantize(new)
    if where.same_position is not None:  # every row at one position: a plain slice copy
        target[:, where.same_position : where.same_position + new.shape[1]] = new
    else:
        target[where.rows, where.positions] = new.to(target.dtype)


def _read(cached: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cached keys or values in `dtype` (an int8 cache's dequantized)."""
    if cached.dtype == torch.int8:
        return kv_int8.dequantize(cached, dtype)
    return cached.to(dtype)


class LayerCache(NamedTuple):
    """One layer's part of the state: keys and values, [B, H, T, D] each (int8 caches
    [B, H, T, D + 4]: `lm.kv_int8`)."""

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
    rotary: Rotary | None = None  # the new tokens' rotation tables, with rotary positions
    bf16_prefill: bool = False  # matrix products in bfloat16 (see `_linear`)
    adapter: torch.Tensor | None = None  # [B] each row's LoRA adapter (lm.lora), when any
    # A prefill of empty rows padded to different lengths: {length: row indices}. Each
    # group attends over its own tokens only, so a row's numbers do not depend on how long
    # its batch-mates are (see CausalSelfAttention.step).
    ends: dict[int, torch.Tensor] | None = None


class MLP(nn.Module):
    """GELU or ReLU-squared between two matrices, or SwiGLU: `c_fc` holds the gate and the
    up projection stacked ([gate; up], as one matrix), `c_proj` is the down projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = mlp_width(config)
        self.kind = config.mlp
        fc_out = 2 * hidden if config.mlp == "swiglu" else hidden
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        if self.kind == "relu2":
            return F.relu(h).square()
        return F.gelu(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rotary: Rotary | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary)
        return x + self.mlp(self.ln_2(x))

    def step(self, x, cache: LayerCache, where: StepIndex) -> torch.Tensor:
        """Generation: the same computation as `forward`, called functionally (no dropout,
        no module-call overhead) because decode runs it for every token."""
        x = x + self.attn.step(_norm(x, self.ln_1), cache, where)
        mlp = self.mlp
        h = mlp.activation(_project(mlp.c_fc, _norm(x, self.ln_2), where))
        return x + _project(mlp.c_proj, h, where)


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, where: StepIndex
) -> torch.Tensor:
    """`F.linear`; in a prefill of BF16_PREFILL_TOKENS or more per row on the CPU, in
    bfloat16 with float32 results.

    A prefill's matrix products are large enough for the CPU's bfloat16 dot-product
    instructions to pay on batches of prompts, while the validation loss of decoding after
    such a prefill moves by 0.00003 nats or less on the shipped GPTs (`python -m
    bench.precision_bench`). The token count is padded to the next power of two from 64,
    then to a multiple of BF16_PREFILL_BLOCK, so that oneDNN builds a kernel for a few
    shapes only (it keeps one per shape). Decode steps on the CPU run in the native step
    (`lm.native.decode`: bfloat16 products where its build has them, `LM_BF16_DECODE`), or
    here in float32.
    """
    if not where.bf16_prefill:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    if len(rows) <= BF16_PREFILL_BLOCK:
        padded = max(64, 1 << (len(rows) - 1).bit_length()) - len(rows)
    else:
        padded = -len(rows) % BF16_PREFILL_BLOCK
    rows = F.pad(rows.to(torch.bfloat16), (0, 0, 0, padded))
    y = F.linear(rows, weight.to(torch.bfloat16), None if bias is None else bias.to(torch.bfloat16))
    return y[: len(y) - padded].float().view(*x.shape[:-1], -1)


def _project(layer: nn.Module, x: torch.Tensor, where: StepIndex) -> torch.Tensor:
    """A linear layer of a block in `step`: `_linear`, plus the layer's low-rank adapter
    delta when it carries one (`lm.lora`; per row when serving several)."""
    y = _linear(x, layer.weight, layer.bias, where)
    add_delta = getattr(layer, "add_delta", None)
    return y if add_delta is None else add_delta(y, x, where.adapter)


def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """`norm(x)` without the module call (decode runs it for every token)."""
    if isinstance(norm, nn.RMSNorm):
        # The weight in x's dtype: under bfloat16 autocast, q and k come as bfloat16.
        return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.context_size = config.block_size
        self.bf16_prefill_tokens = BF16_PREFILL_TOKENS  # for the engine's prefill batches
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = (
            nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        )
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if not name.endswith("c_proj.weight"):
                continue
            if config.zero_init_proj:  # each block starts as the identity (modded-nanogpt)
                nn.init.zeros_(param)
            else:  # scaled init of residual projections (GPT-2)
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Parameters, counting a tied embedding once and excluding learned positions."""
        positions = 0 if self.wpe is None else self.wpe.weight.numel()
        return sum(p.numel() for p in self.parameters()) - positions

    def _rotary(self, positions: torch.Tensor) -> Rotary | None:
        if self.config.position != "rope":
            return None
        return rotary_tables(
            positions, self.config.n_embd // self.config.n_head, self.config.rope_theta
        )

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, self.lm_head.weight)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        time = ids.shape[1]
        if time > self.config.block_size:
            raise ValueError(
                f"sequence of {time} tokens exceeds block size {self.config.block_size}"
            )
        positions = torch.arange(time, device=ids.device)
        x = self.wte(ids) if self.wpe is None else self.wte(ids) + self.wpe(positions)
        x = self.drop(x)
        rotary = self._rotary(positions)
        for block in self.blocks:
            x = block(x, rotary)
        return self.ln_f(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._logits(self.hidden(ids))

    def init_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        cache_dtype: torch.dtype | None = None,
    ) -> State:
        """Empty state for `batch_size` rows: positions and a KV cache per layer (in
        `cache_dtype`, by default the model's; torch.int8: `lm.kv_int8`)."""
        c = self.config
        device = device or self.wte.weight.device
        dtype = cache_dtype or self.wte.weight.dtype
        head_dim = kv_int8.width(c.n_embd // c.n_head, dtype)
        state = {"pos": torch.zeros(batch_size, dtype=torch.long, device=device)}
        for layer in range(c.n_layer):  # keys and values [B, H, T, D]
            state[f"k{layer}"] = torch.zeros(
                (batch_size, c.n_head, c.block_size, head_dim), device=device, dtype=dtype
            )
            state[f"v{layer}"] = torch.zeros(
                (batch_size, c.n_head, c.block_size, head_dim), device=device, dtype=dtype
            )
        if getattr(self, "adapter_count", 0):  # serving LoRA adapters: each row's (0: none)
            state["adapter"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return state

    def read_prefix(self, state: State, row: int, start: int, end: int, block: int) -> list[State]:
        """Row `row`'s KV cache for positions [start, end), copied once and cut into pieces
        of `block` positions (lm.prefix_cache)."""
        pieces: list[State] = [{} for _ in range(0, end - start, block)]
        for layer in range(self.config.n_layer):
            keys = state[f"k{layer}"][row, :, start:end].clone()
            values = state[f"v{layer}"][row, :, start:end].clone()
            for piece, k, v in zip(pieces, keys.split(block, -2), values.split(block, -2)):
                piece[f"k{layer}"], piece[f"v{layer}"] = k, v
        return pieces

    def write_prefix(self, state: State, row: int | list[int], pieces: list[State]) -> int:
        """Write consecutive `read_prefix` pieces into row `row` (or each of several rows)
        from position 0 and set its position after them; return that position. The pieces
        are joined once per cache tensor, then written into all the rows in one copy."""
        rows = [row] if isinstance(row, int) else row
        end = sum(piece["k0"].shape[-2] for piece in pieces)
        state["pos"][rows] = end
        if not pieces or not rows:
            return end
        first = rows[0]
        adjacent = rows == list(range(first, first + len(rows)))
        index = None if adjacent else torch.tensor(rows, device=state["pos"].device)
        for name in (f"{kind}{layer}" for layer in range(self.config.n_layer) for kind in "kv"):
            joined = torch.cat([piece[name] for piece in pieces], dim=-2)  # [H, end, D]
            if adjacent:
                state[name][first : first + len(rows), :, :end] = joined
            else:
                state[name][index, :, :end] = joined
        return end

    def step(
        self, ids: torch.Tensor, state: State, lengths: list[int] | None = None
    ) -> tuple[torch.Tensor, State]:
        """Consume `ids[B,t]` after what `state` holds; return next-token logits[B,V].

        The KV cache is written in place; rows may be at different positions. A decode
        step on the CPU runs the whole model in one compiled call where it can
        (`_native_decode`), which computes what the layers below compute. `lengths`: each
        row's real tokens, the rest of `t` padding (its keys and values land past the row's
        end, its logits mean nothing, and the caller sets `pos`); in a prefill of empty
        rows they attend in groups by length (PyTorch's fused causal kernel gives a row's
        tokens other last bits at another key length), so a row's numbers are its own.
        """
        batch, time = ids.shape
        if time == 1 and not torch.is_grad_enabled():
            logits = self._native_decode(ids, state)
            if logits is not None:
                return logits, {**state, "pos": state["pos"] + 1}
        pos = state["pos"]
        first, last = int(pos.min()), int(pos.max())
        length = last + time
        if length > self.config.block_size:
            raise ValueError(
                f"state of {length} tokens exceeds block size {self.config.block_size}"
            )
        positions = pos[:, None] + torch.arange(time, device=ids.device)  # [B, t]
        native = None
        if (
            time == 1
            and ids.device.type == "cpu"
            and not torch.is_grad_enabled()
            and self.wte.weight.dtype == torch.float32
            and state["k0"].dtype in CACHE_DTYPES
        ):
            native = decode_attention()
        bias = None  # the attention mask, where rows or queries see different keys
        fresh = time > 1 and first == last == 0  # a prefill of empty rows: causal attention
        if native is None and not fresh and (first != last or time > 1):
            keys = torch.arange(length, device=ids.device)
            blocked = (keys[None, None, :] > positions[:, :, None]).unsqueeze(1)
            bias = torch.zeros(blocked.shape, device=ids.device, dtype=self.wte.weight.dtype)
            bias.masked_fill_(blocked, -math.inf)
        ends = None  # empty rows padded to different lengths: their rows by length
        if fresh and lengths is not None and len(set(lengths)) > 1:
            groups: dict[int, list[int]] = {}
            for row, n in enumerate(lengths):
                groups.setdefault(n, []).append(row)
            ends = {n: torch.tensor(rows, device=ids.device) for n, rows in groups.items()}
        bf16_prefill = (
            time >= BF16_PREFILL_TOKENS
            and ids.device.type == "cpu"
            and self.wte.weight.dtype == torch.float32
            and bf16_matmul_is_fast()
        )
        where = StepIndex(
            positions=positions,
            rows=torch.arange(batch, device=ids.device)[:, None],
            first=first,
            length=length,
            same_position=first if first == last else None,
            bias=bias,
            native=native,
            bf16_prefill=bf16_prefill,
            rotary=self._rotary(positions),
            adapter=_adapters(state),
            ends=ends,
        )
        x = self.wte(ids) if self.wpe is None else self.wte(ids) + self.wpe(positions)
        for layer, block in enumerate(self.blocks):
            x = block.step(x, LayerCache(state[f"k{layer}"], state[f"v{layer}"]), where)
        logits = self._logits(_norm(x[:, -1], self.ln_f))
        return logits, {**state, "pos": pos + time}

    def fixed_step(self, ids: torch.Tensor, state: State) -> torch.Tensor:
        """A decode step (`ids[B, 1]`) that asks the host nothing, for a CUDA graph
        (`lm.cuda_graphs`): every row attends over the whole cache, later positions masked,
        so that no shape or branch depends on the rows' positions. Writes the new keys and
        values and advances `state["pos"]` in place; returns the logits [B, V]. Rows past
        the end of the context (free rows a graph carries along) write into its last slot.
        """
        batch = ids.shape[0]
        block_size = self.config.block_size
        pos = state["pos"]
        positions = pos.clamp(max=block_size - 1)[:, None]  # [B, 1]
        keys = torch.arange(block_size, device=ids.device)
        blocked = (keys[None, None, :] > positions[:, :, None]).unsqueeze(1)  # [B, 1, 1, T]
        bias = torch.zeros(blocked.shape, device=ids.device, dtype=self.wte.weight.dtype)
        bias.masked_fill_(blocked, -math.inf)
        where = StepIndex(
            positions=positions,
            rows=torch.arange(batch, device=ids.device)[:, None],
            first=0,
            length=block_size,
            same_position=None,
            bias=bias,
            rotary=self._rotary(positions),
        )
        x = self.wte(ids) if self.wpe is None else self.wte(ids) + self.wpe(positions)
        for layer, block in enumerate(self.blocks):
            x = block.step(x, LayerCache(state[f"k{layer}"], state[f"v{layer}"]), where)
        pos.add_(1)
        return self._logits(_norm(x[:, -1], self.ln_f))

    def generate_run(
        self, token: int, row: int, state: State, temperature: float, uniform: list[float]
    ) -> list[int] | None:
        """Feed `token` to row `row` of `state`, draw the next token from its logits at
        `temperature` (0: greedy) with `uniform[0]`, feed that, and so on: one compiled call
        (`lm.native.decode.generate_step`) for `len(uniform)` tokens, drawn as the engine's
        sampler draws them. Returns the drawn tokens (fewer where a step's logits were not
        finite) and advances the row's position by as many; None where the native step
        does not apply (then nothing has changed)."""
        position = int(state["pos"][row])
        if position + len(uniform) > self.config.block_size:
            raise ValueError(
                f"state of {position + len(uniform)} tokens exceeds block size "
                f"{self.config.block_size}"
            )
        one = {name: tensor[row : row + 1] for name, tensor in state.items()}
        run = generate_step()
        if run is None or not self._native_applies(one):
            return None
        packed = self._native_weights()
        if packed is None:
            return None
        layers = range(self.config.n_layer)
        tokens = run(
            packed,
            token,
            position,
            [one[f"k{layer}"] for layer in layers],
            [one[f"v{layer}"] for layer in layers],
            temperature,
            uniform,
        )
        state["pos"][row] += len(tokens)
        return tokens

    def _native_applies(self, state: State) -> bool:
        """Whether the compiled step can run this model on `state`: on the CPU, float32,
        a cache dtype it takes, no row with a LoRA adapter, and a compiler."""
        return (
            state["k0"].device.type == "cpu"
            and self.wte.weight.dtype == torch.float32
            and state["k0"].dtype in CACHE_DTYPES
            and _adapters(state) is None
            and decode_attention() is not None  # LM_NATIVE=0, or no compiler
        )

    def _native_decode(self, ids: torch.Tensor, state: State) -> torch.Tensor | None:
        """A decode step's logits from the compiled whole-model step (`lm.native.decode`),
        or None where it does not apply: off the CPU, not float32, a cache
        dtype it does not take, rows with LoRA adapters, or no compiler (then `step` runs in
        PyTorch)."""
        if ids.device.type != "cpu" or not self._native_applies(state):
            return None
        step = decode_step()
        packed = self._native_weights() if step is not None else None
        if packed is None:
            return None
        layers = range(self.config.n_layer)
        return step(
            packed,
            ids.reshape(-1).contiguous(),
            state["pos"],
            [state[f"k{layer}"] for layer in layers],
            [state[f"v{layer}"] for layer in layers],
        )

    def _native_weights(self) -> PackedGPT | None:
        """The weights packed for the native step, packed again when any parameter or
        layer has changed since (in place, reassigned, replaced); None while a layer
        carries a LoRA adapter that applies to every row (`lm.lora.LoRALinear`)."""
        cached = self.__dict__.get("_native_pack")
        matrices = decode_matrices(self.__dict__.get("decode_matrices"))
        if cached is not None and cached.matrices == matrices and cached.unchanged():
            return cached.packed
        watch, packed = _Watch.of(self), None
        linears = [
            layer
            for block in self.blocks
            for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        ]
        if all(type(layer) in (nn.Linear, MultiLoRALinear) for layer in linears):
            packed = self._pack(matrices)
        self._native_pack = _NativePack(packed, watch, matrices)
        return packed

    def _pack(self, matrices: str = "float32") -> PackedGPT:
        c = self.config
        tensors = {
            "wte": self.wte.weight,
            "wpe": None if self.wpe is None else self.wpe.weight,
            "ln_f.weight": self.ln_f.weight,
            "ln_f.bias": getattr(self.ln_f, "bias", None),
            "lm_head": self.lm_head.weight,
        }
        if c.position == "rope":
            cos, sin = self._rotary(torch.arange(c.block_size))
            tensors["rope_cos"], tensors["rope_sin"] = cos.squeeze(-2), sin.squeeze(-2)
        for i, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            parts = {
                "ln_1": block.ln_1,
                "attn.c_attn": attn.c_attn,
                "attn.c_proj": attn.c_proj,
                "ln_2": block.ln_2,
                "mlp.c_fc": mlp.c_fc,
                "mlp.c_proj": mlp.c_proj,
            }
            for name, part in parts.items():
                tensors[f"blocks.{i}.{name}.weight"] = part.weight
                tensors[f"blocks.{i}.{name}.bias"] = getattr(part, "bias", None)
            if attn.q_norm is not None:
                tensors[f"blocks.{i}.attn.q_norm"] = attn.q_norm.weight
                tensors[f"blocks.{i}.attn.k_norm"] = attn.k_norm.weight
        q_norm = self.blocks[0].attn.q_norm
        return pack(
            tensors,
            n_layer=c.n_layer,
            n_embd=c.n_embd,
            n_head=c.n_head,
            hidden=mlp_width(c),
            vocab=c.vocab_size,
            context=c.block_size,
            rmsnorm=c.norm == "rmsnorm",
            mlp=c.mlp,
            eps=_eps(self.ln_f),
            qk_eps=RMS_NORM_EPS if q_norm is None else _eps(q_norm),
            softcap=c.logit_softcap,
            matrices=matrices,
        )


def _eps(norm: nn.Module) -> float:
    return torch.finfo(torch.float32).eps if norm.eps is None else norm.eps


@dataclass
class _Watch:
    """What a packed copy of a model's weights was made from: every module and parameter
    slot with what it held, each parameter's storage and version counter. (Parameters made
    in inference mode have no version counter: changing those in place goes unnoticed.)"""

    containers: list[dict]  # every module's _modules and _parameters, once per entry
    names: list[str]  # the entry's name in its container
    held: list[object]  # what the entry held
    parameters: list[torch.Tensor]
    inference: list[torch.Tensor]
    stamps: tuple[list[tuple[int, int]], list[int]]

    @classmethod
    def of(cls, model: nn.Module) -> _Watch:
        containers, names, held, parameters, inference = [], [], [], [], []
        for module in model.modules():
            for container in (module._modules, module._parameters):
                for name, value in container.items():
                    containers.append(container)
                    names.append(name)
                    held.append(value)
            for p in module._parameters.values():
                if p is not None:
                    (inference if p.is_inference() else parameters).append(p)
        stamps = _stamps(parameters, inference)
        return cls(containers, names, held, parameters, inference, stamps)

    def unchanged(self) -> bool:
        # Asked at every decode step: the comparisons run in C (map), not a Python loop.
        return (
            all(map(operator.is_, map(dict.get, self.containers, self.names), self.held))
            and _stamps(self.parameters, self.inference) == self.stamps
        )


def _stamps(parameters: list[torch.Tensor], inference: list[torch.Tensor]):
    return [(p._version, p.data_ptr()) for p in parameters], [p.data_ptr() for p in inference]


class _NativePack(NamedTuple):
    packed: PackedGPT | None  # None: a layer the native step cannot run
    watch: _Watch
    matrices: str  # what the matrices hold (`lm.native.decode.decode_matrices`)

    def unchanged(self) -> bool:
        return self.watch.unchanged()


def _adapters(state: State) -> torch.Tensor | None:
    """The rows' adapter indices, or None when no row uses one (nothing to add)."""
    adapter = state.get("adapter")
    return adapter if adapter is not None and bool(adapter.any()) else None
