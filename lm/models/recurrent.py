"""Recurrent language models: one `RecurrentLM` over `nn.RNN` (tanh), `nn.GRU` or `nn.LSTM`."""

from __future__ import annotations

import torch
from torch import nn

from lm.models import ModelConfig, State
from lm.native.dropout import Dropout

_CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class RecurrentLM(nn.Module):
    """Embedding -> multi-layer RNN/GRU/LSTM -> linear head tied to the embedding."""

    context_size = None  # the hidden state carries any length

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = Dropout(config.dropout)
        cell = _CELLS[config.kind]
        extra = {"nonlinearity": "tanh"} if config.kind == "rnn" else {}
        self.rnn = cell(
            config.n_embd,
            config.n_embd,
            num_layers=config.n_layer,
            batch_first=True,
            dropout=config.dropout if config.n_layer > 1 else 0.0,
            **extra,
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=True)
        self.lm_head.weight = self.wte.weight  # weight tying
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        c = self.config
        device = device or self.wte.weight.device
        shape = (batch_size, c.n_layer, c.n_embd)  # batch first, unlike torch's RNNs
        state = {"h": torch.zeros(shape, device=device, dtype=self.wte.weight.dtype)}
        if c.kind == "lstm":
            state["c"] = torch.zeros_like(state["h"])
        return state

    def _run(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        x = self.drop(self.wte(ids))
        if state is None:
            state = self.init_state(ids.shape[0], ids.device)
        if self.config.kind == "lstm":
            hx = (state["h"].transpose(0, 1).contiguous(), state["c"].transpose(0, 1).contiguous())
            out, (h, c) = self.rnn(x, hx)
            new_state = {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}
        else:
            out, h = self.rnn(x, state["h"].transpose(0, 1).contiguous())
            new_state = {"h": h.transpose(0, 1)}
        return self.drop(out), new_state

    def hidden(self, ids: torch.Tensor, state: State | None = None) -> torch.Tensor:
        return self._run(ids, state)[0]

    def forward(self, ids: torch.Tensor, state: State | None = None, return_state: bool = False):
        """Logits for every position; with `return_state`, also the state after the last
        (training on contiguous streams carries it to the next batch)."""
        out, new_state = self._run(ids, state)
        logits = self.lm_head(out)
        return (logits, new_state) if return_state else logits

    def step(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        # oneDNN's RNN kernels cost milliseconds of set-up per call, which a decode step
        # pays for every token; PyTorch's own kernels are several times faster here.
        mkldnn = torch.backends.mkldnn
        enabled, mkldnn.enabled = mkldnn.enabled, False
        try:
            out, new_state = self._run(ids, state)
        finally:
            mkldnn.enabled = enabled
        return self.lm_head(out[:, -1]), new_state
