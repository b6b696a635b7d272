"""Low-rank adapters (LoRA) for a GPT's linear layers: train one, save it, merge it, or
serve many on one base model with a per-row adapter index.

Our own short module rather than `peft`: peft swaps each `nn.Linear` for a wrapper whose
`forward` adds the low-rank path, but `GPT.step` (every generation step) reads the weights
and multiplies them itself (`lm.models.gpt._linear`: bfloat16 prefills, the native decode
path), so a peft-wrapped GPT would train with the adapter and generate without it. And
serving adapters of one base in one batch needs the adapter chosen per state row, which the
engine moves with each row (`state["adapter"]`), not per module or per call.

y = x W^T + b + scale * (x A^T) B^T, with A [r, in], B [out, r], scale = alpha / r; B
starts at zero so a new adapter leaves the base's outputs unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lm.errors import LMError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FORMAT = "lm-adapter"
# The attention's qkv and output projections and the MLP's up and down projections: every
# matrix of a GPT block (`c_proj` names both output projections).
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")
RECURRENT_HINT = (
    "LoRA applies to GPT models: a recurrent model's matrices are fused inside "
    "torch's RNN/GRU/LSTM kernels and its only linear layer is tied to the "
    "embedding; fine-tune it fully with --init-from instead"
)


class LoRALinear(nn.Module):
    """A frozen linear layer plus one trainable low-rank delta (training and `lm generate`)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the same (frozen) parameters
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_delta(F.linear(x, self.weight, self.bias), x, None)

    def add_delta(
        self, y: torch.Tensor, x: torch.Tensor, adapter: torch.Tensor | None
    ) -> torch.Tensor:
        """`y` (the base layer's output for `x`) plus this adapter's delta."""
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


class MultiLoRALinear(nn.Module):
    """A linear layer plus a bank of fixed adapters, one chosen per row (serving).

    The bank holds A [N+1, r, in] and B [N+1, out, r] with the scale folded into B; entry 0
    is all zeros (the base model), adapters of smaller rank are padded with zeros.
    """

    def __init__(self, base: nn.Linear, bank_A: torch.Tensor, bank_B: torch.Tensor):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("bank_A", bank_A)
        self.register_buffer("bank_B", bank_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # no row index here: the base model

    def add_delta(
        self, y: torch.Tensor, x: torch.Tensor, adapter: torch.Tensor | None
    ) -> torch.Tensor:
        """`y` plus each row's adapter delta; `adapter[B]` indexes the bank (0: none).

        A row's result must not depend on which rows share its batch (same seed, same text,
        alone or mixed), and matrix-product kernels round differently with the row count.
        So a decode step (one token per row) takes elementwise products and sums over the
        rows' gathered matrices, and a prefill takes each adapted row's two products alone.
        """
        if adapter is None:
            return y
        if x.shape[1] == 1:
            low = (x.unsqueeze(-2) * self.bank_A[adapter].unsqueeze(1)).sum(-1)  # [B, 1, r]
            return y + (low.unsqueeze(-2) * self.bank_B[adapter].unsqueeze(1)).sum(-1)
        for row, index in enumerate(adapter.tolist()):
            if index:
                y[row] += F.linear(F.linear(x[row], self.bank_A[index]), self.bank_B[index])
        return y


def _targets(model: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the linear layers of `model` whose last name part is one of `targets`."""
    if getattr(model, "config", None) is None or model.config.kind != "gpt":
        raise LMError(RECURRENT_HINT)
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, LoRALinear, MultiLoRALinear))
        and name.split(".")[-1] in targets
        and name.startswith("blocks.")
    ]
    unknown = [t for t in targets if not any(n.split(".")[-1] == t for n in found)]
    if unknown:
        raise LMError(
            f"--lora-targets: no linear layer of the GPT's blocks is called "
            f"{', '.join(unknown)}; choose among c_attn, c_proj, c_fc"
        )
    return found


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
) -> int:
    """Freeze `model` and give each target linear layer a trainable adapter; return the
    number of trainable parameters."""
    if rank < 1:
        raise LMError(f"--lora-rank must be at least 1, got {rank}")
    if alpha <= 0:
        raise LMError(f"--lora-alpha must be positive, got {alpha}")
    names = _targets(model, targets)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise LMError(f"{name} already carries adapters")
        _replace(model, name, LoRALinear(base, rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of a model made by `add_lora`, by module name."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            tensors[f"{name}.lora_A"] = module.lora_A.detach().cpu().contiguous()
            tensors[f"{name}.lora_B"] = module.lora_B.detach().cpu().contiguous()
    return tensors


def weights_hash(checkpoint_dir: Path) -> str:
    """The fingerprint of a checkpoint's weights that adapters name their base by."""
    digest = hashlib.sha256()
    with open(Path(checkpoint_dir) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def base_info(checkpoint_dir: Path) -> dict:
    """How a fine-tune or an adapter names its parent: directory name, path and hash."""
    path = Path(checkpoint_dir).resolve()
    return {"name": path.name, "path": str(path), "weights_hash": weights_hash(path)}


def save_adapter(
    directory: Path, model: nn.Module, base: dict, training: dict | None = None
) -> None:
    """Write an adapter directory (config + safetensors), each file replaced atomically."""
    from safetensors.torch import save_file

    modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not modules:
        raise LMError("the model carries no trainable adapter to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-adapter-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    tensors = adapter_tensors(model)
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": 1,
        "base": base,
        "rank": modules[0].rank,
        "alpha": modules[0].alpha,
        "modules": sorted({name.rsplit(".", 1)[0] for name in tensors}),
        "trainable_params": sum(t.numel() for t in tensors.values()),
        "training": training or {},
    }
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def update_adapter_training(directory: Path, training: dict) -> None:
    """Replace the training summary in an adapter's config (atomically)."""
    path = Path(directory) / ADAPTER_CONFIG
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["training"] = training
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def is_adapter(directory: Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


@dataclass
class Adapter:
    """A loaded adapter directory: its config and its A and B matrices by module name."""

    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def scale(self) -> float:
        return float(self.meta["alpha"]) / int(self.meta["rank"])

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module name -> (A [r, in], B [out, r])."""
        return {
            m: (self.tensors[f"{m}.lora_A"], self.tensors[f"{m}.lora_B"])
            for m in self.meta["modules"]
        }


def load_adapter(directory: str | Path) -> Adapter:
    """Read an adapter directory (JSON and safetensors only); damage is an LMError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LMError(f"{path}: missing; {directory} is not an lm adapter") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LMError(f"{path}: damaged ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise LMError(f'{path}: not an lm adapter config (no "format": "{ADAPTER_FORMAT}")')
    for key in ("base", "rank", "alpha", "modules"):
        if key not in meta:
            raise LMError(f"{path}: missing {key!r}")
    try:
        tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise LMError(f"{directory / ADAPTER_WEIGHTS}: missing or damaged ({exc})") from exc
    adapter = Adapter(directory, meta, tensors)
    for module, (a, b) in _checked_pairs(adapter).items():
        if a.shape[0] != meta["rank"] or b.shape[1] != meta["rank"]:
            raise LMError(
                f"{directory}: {module} has rank {a.shape[0]}, the config says {meta['rank']}"
            )
    return adapter


def _checked_pairs(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    try:
        return adapter.pairs()
    except KeyError as exc:
        raise LMError(f"{adapter.path / ADAPTER_WEIGHTS}: no tensor {exc.args[0]}") from None


def find_base(adapter: Adapter) -> Path:
    """The base checkpoint an adapter was trained on: its recorded path, else the shipped
    checkpoint of its name, as long as the weights' hash matches."""
    from lm.checkpoint import resolve, shipped_dir

    base = adapter.meta["base"]
    for candidate in (base.get("path"), shipped_dir() / str(base.get("name"))):
        if candidate and Path(candidate, "model.safetensors").is_file():
            if weights_hash(Path(candidate)) == base.get("weights_hash"):
                return resolve(candidate)
    raise LMError(
        f"{adapter.path}: its base {base.get('name')!r} ({base.get('weights_hash')}) "
        f"is neither at {base.get('path')} nor shipped with those weights"
    )


def check_fits(adapter: Adapter, model: nn.Module, base_dir: Path | None = None) -> None:
    """An LMError unless `adapter` was made for this base (by hash) and its matrices fit."""
    if base_dir is not None and weights_hash(base_dir) != adapter.meta["base"].get("weights_hash"):
        raise LMError(
            f"adapter {adapter.path} was trained on {adapter.meta['base'].get('name')!r}"
            f" ({adapter.meta['base'].get('weights_hash')}), not on {Path(base_dir).name}"
            f" ({weights_hash(base_dir)})"
        )
    for module, (a, b) in _checked_pairs(adapter).items():
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise LMError(f"adapter {adapter.path}: the base has no layer {module}") from None
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise LMError(
                f"adapter {adapter.path}: {module} is {b.shape[0]}x{a.shape[1]} with "
                f"rank {a.shape[0]}, the base's layer is "
                f"{layer.out_features}x{layer.in_features}"
            )


@torch.no_grad()
def merge(model: nn.Module, adapter: Adapter) -> None:
    """Add an adapter's delta into the base weights: W += scale * B @ A."""
    check_fits(adapter, model)
    for module, (a, b) in adapter.pairs().items():
        layer = model.get_submodule(module)
        weight = layer.weight
        weight += (adapter.scale * (b.double() @ a.double())).to(weight.device, weight.dtype)


@torch.no_grad()
def attach_adapters(model: nn.Module, adapters: list[Adapter]) -> None:
    """Give `model` a bank of adapters for serving: request rows with `state["adapter"]` =
    i use `adapters[i - 1]`, 0 the base. Ranks may differ (padded with zeros)."""
    if getattr(model, "adapter_count", 0):
        raise LMError("this model already serves adapters")
    if not adapters:
        return
    for adapter in adapters:
        if getattr(model, "config", None) is None or model.config.kind != "gpt":
            raise LMError(RECURRENT_HINT)
        check_fits(adapter, model)
    rank = max(int(a.meta["rank"]) for a in adapters)
    modules = sorted({m for a in adapters for m in a.meta["modules"]})
    for module in modules:
        layer = model.get_submodule(module)
        device, dtype = layer.weight.device, layer.weight.dtype
        bank_A = torch.zeros(len(adapters) + 1, rank, layer.in_features, device=device, dtype=dtype)
        bank_B = torch.zeros(
            len(adapters) + 1, layer.out_features, rank, device=device, dtype=dtype
        )
        for i, adapter in enumerate(adapters, 1):
            if module in adapter.meta["modules"]:
                a, b = adapter.pairs()[module]
                bank_A[i, : a.shape[0]] = a.to(device, dtype)
                bank_B[i, :, : b.shape[1]] = (b * adapter.scale).to(device, dtype)
        _replace(model, module, MultiLoRALinear(layer, bank_A, bank_B))
    model.adapter_count = len(adapters)


def load_adapter_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
):
    """A `Checkpoint` of the adapter's base with the adapter merged in (for `lm generate`,
    `lm eval` and `lm merge`); its name is the adapter directory's."""
    from lm.checkpoint import load_checkpoint

    adapter = load_adapter(directory)
    base_dir = find_base(adapter)
    checkpoint = load_checkpoint(base_dir, "cpu")
    merge(checkpoint.model, adapter)
    checkpoint.model.to(device=device, dtype=dtype).eval()
    checkpoint.path = Path(directory)
    checkpoint.meta = dict(
        checkpoint.meta,
        adapter={k: v for k, v in adapter.meta.items() if k != "training"},
        training=adapter.meta.get("training") or checkpoint.training,
    )
    return checkpoint
