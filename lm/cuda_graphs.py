"""GPT decode steps replayed from CUDA graphs.

A decode step of a small GPT on a GPU is a hundred or so tiny kernels, and launching them
from Python costs more than running them. A CUDA graph records the launches once and
replays them in one call. `GraphedDecode` keeps one graph per batch bucket (1, 2, 4, ...
up to the engine's rows): a step of n rows replays the smallest bucket that holds them,
and the rows past n (free rows) are computed and ignored.

The graphs run `GPT.fixed_step` over the engine's own state tensors, which never move, so
the recorded addresses stay valid: each row attends over the whole cache with its later
positions masked, and nothing in the step asks the host for a position.
"""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


def applies(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether `model`'s decode steps can run from CUDA graphs on `device`."""
    return (
        device.type == "cuda"
        and hasattr(model, "fixed_step")
        and not getattr(model, "adapter_count", 0)  # per-row adapters: eager steps
    )


class GraphedDecode:
    """Decode steps over `state` (the engine's rows, allocated once) from CUDA graphs."""

    def __init__(self, model: torch.nn.Module, state: State, max_batch: int):
        self.model = model
        self.state = state
        self.max_batch = max_batch
        device = state["pos"].device
        self.ids = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def capture_all(self) -> None:
        """Record every bucket's graph now (a server does this at start, so that no request
        waits for a recording); the rows' state is left as it was."""
        size = 1
        while True:
            size = self.bucket(size)
            if size not in self.graphs:
                self.graphs[size] = self._capture(size)
            if size == self.max_batch:
                return
            size *= 2

    def bucket(self, rows: int) -> int:
        size = 1
        while size < rows:
            size *= 2
        return min(size, self.max_batch)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """The next-token logits [n, V] of rows 0..n-1 given their newest tokens `ids[n, 1]`;
        their keys, values and positions are written into the state."""
        rows = ids.shape[0]
        size = self.bucket(rows)
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, logits = self.graphs[size]
        self.ids[:rows].copy_(ids)
        graph.replay()
        return logits[:rows]

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record the step of `size` rows. The warm-up runs it for real (CUDA graphs
        need the libraries' lazy set-up done first), so the rows' state is kept aside
        and put back afterwards."""
        view = {name: tensor[:size] for name, tensor in self.state.items()}
        saved = {name: tensor.clone() for name, tensor in view.items()}
        ids = self.ids[:size]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model.fixed_step(ids, view)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model.fixed_step(ids, view)
        for name, tensor in view.items():
            tensor.copy_(saved[name])
        return graph, logits
