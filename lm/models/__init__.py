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

from dataclasses import asdict, dataclass, fields

import torch

from lm.errors import LMError

KINDS = ("rnn", "gru", "lstm", "gpt")

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
    bias: bool = False  # GPT: biases in Linear and LayerNorm

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LMError(f"unknown model {self.kind!r}; choose one of {', '.join(KINDS)}")
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "block_size"):
            if getattr(self, name) < 1:
                raise LMError(f"--{name.replace('_', '-')} must be at least 1")
        if self.kind == "gpt" and self.n_embd % self.n_head:
            raise LMError(
                f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise LMError(f"--dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def build_model(config: ModelConfig) -> torch.nn.Module:
    """Build an untrained model of `config.kind`."""
    if config.kind == "gpt":
        from lm.models.gpt import GPT

        return GPT(config)
    from lm.models.recurrent import RecurrentLM

    return RecurrentLM(config)
