"""Model registry: one config dataclass and `build_model` for every kind.

Every model is an `nn.Module` with:
- `forward(ids[B,T]) -> logits[B,T,V]` for training (teacher forcing);
- `hidden(ids[B,T]) -> h[B,T,C]`, the final hidden states (for embeddings);
- `init_state(batch_size) -> State` and `step(ids[B,t], state) -> (logits[B,V], state)`
  for generation. A `State` is a dict of tensors whose first dimension is the batch, so
  the engine can stack, split and move rows of any model's state the same way.
- `context_size`: how many tokens the state can hold (None for no limit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch

from lm.errors import LMError

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "gpt"
    vocab_size: int = 256
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4  # GPT only
    block_size: int = 256  # GPT: context length; RNN: truncated-BPTT length in training
    dropout: float = 0.0
    # GPT: dropout on the attention probabilities; None = `dropout`. On the CPU any non-zero
    # value sends training attention to PyTorch's unfused path (~3.7x slower at 256 tokens).
    attn_dropout: float | None = None
    bias: bool = False  # GPT: biases in Linear and LayerNorm
    # GPT block options; the defaults are the classic GPT-2 block (and what a config.json
    # without these keys means). position="rope", norm="rmsnorm", qk_norm, mlp="swiglu",
    # tie_embeddings=False and bias=False together are exactly Qwen3 (without qk_norm:
    # Llama); zero_init_proj changes the initialisation only. logit_softcap and
    # mlp="relu2" leave what transformers and llama.cpp run.
    position: str = "learned"  # "learned" table of block_size positions, or "rope" (rotary)
    rope_theta: float = 10000.0  # rotary base (HF/NeoX rotate-half convention)
    norm: str = "layernorm"  # or "rmsnorm"
    qk_norm: bool = False  # RMSNorm per head on queries and keys (as Qwen3)
    mlp: str = "gelu"  # "gelu" (4x), "relu2" (ReLU squared, 4x) or "swiglu" (gate/up/down)
    mlp_hidden: int | None = None  # MLP width; default 4*n_embd, swiglu 8/3*n_embd (x32)
    tie_embeddings: bool = True  # output layer shares the token embedding's weights
    zero_init_proj: bool = False  # attention and MLP output projections start at zero
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0 turns it off

    def __post_init__(self):
        model_builder(self.kind)  # an unknown kind is an error here, not at build time
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "block_size"):
            if getattr(self, name) < 1:
                raise LMError(f"--{name.replace('_', '-')} must be at least 1")
        if self.kind == "gpt" and self.n_embd % self.n_head:
            raise LMError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")
        choices = {
            "position": ("learned", "rope"),
            "norm": ("layernorm", "rmsnorm"),
            "mlp": ("gelu", "relu2", "swiglu"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LMError(
                    f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.kind == "gpt" and self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise LMError("rotary positions need an even head size (--n-embd / --n-head)")
        if self.rope_theta <= 0 or self.logit_softcap < 0:
            raise LMError("--rope-theta must be positive and --logit-softcap not negative")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise LMError("--mlp-hidden must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise LMError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.attn_dropout is not None and not 0.0 <= self.attn_dropout < 1.0:
            raise LMError(f"--attn-dropout must be in [0, 1), got {self.attn_dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _gpt(config: ModelConfig) -> torch.nn.Module:
    from lm.models.gpt import GPT

    return GPT(config)


def _recurrent(config: ModelConfig) -> torch.nn.Module:
    from lm.models.recurrent import RecurrentLM

    return RecurrentLM(config)


# The one registry of model kinds: name -> builder of an untrained model from its config.
MODELS: dict[str, Callable[[ModelConfig], torch.nn.Module]] = {
    "rnn": _recurrent,
    "gru": _recurrent,
    "lstm": _recurrent,
    "gpt": _gpt,
}
KINDS = tuple(MODELS)


def model_builder(kind: str) -> Callable[[ModelConfig], torch.nn.Module]:
    """The builder registered as `kind`; an unknown kind is an LMError."""
    try:
        return MODELS[kind]
    except (KeyError, TypeError):
        raise LMError(f"unknown model {kind!r}; choose one of {', '.join(KINDS)}") from None


def build_model(config: ModelConfig) -> torch.nn.Module:
    """Build an untrained model of `config.kind`."""
    return model_builder(config.kind)(config)
