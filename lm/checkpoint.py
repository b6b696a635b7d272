"""Save and load checkpoint directories: config.json, model.safetensors, tokenizer files.

Loading uses JSON and safetensors only (no pickle). Saving writes every file to a
temporary directory first and then moves each into place, weights before config, so a
crash at any moment leaves a loadable checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from lm.errors import LMError
from lm.models import ModelConfig, build_model
from lm.tokenizers import Tokenizer, load_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
FORMAT = "lm-checkpoint"
FORMAT_VERSION = 1


def shipped_dir() -> Path:
    """Where shipped checkpoints live: $LM_CHECKPOINTS_DIR, the package data of a wheel
    install (`lm/checkpoints/`, see setup.py), else the source tree's `checkpoints/`."""
    env = os.environ.get("LM_CHECKPOINTS_DIR")
    if env:
        return Path(env)
    packaged = Path(str(resources.files("lm") / "checkpoints"))
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "checkpoints"  # a checkout or editable install


DEFAULT_CHECKPOINT = "shakespeare-char-gpt"


def shipped_checkpoints() -> list[str]:
    root = shipped_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).is_file())


def resolve(name_or_dir: str | Path) -> Path:
    """A checkpoint directory from a path, or from the name of a shipped checkpoint."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    shipped = shipped_dir() / str(name_or_dir)
    if "/" not in str(name_or_dir) and shipped.is_dir():
        return shipped
    names = ", ".join(shipped_checkpoints()) or "none"
    raise LMError(f"no checkpoint {str(name_or_dir)!r}: not a directory nor a shipped name ({names})")


@dataclass
class Checkpoint:
    model: torch.nn.Module
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def training(self) -> dict:
        return self.meta.get("training", {})


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise LMError(f"{path}: missing; {directory} is not an lm checkpoint")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LMError(f"{path}: damaged ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LMError(f"{path}: not an lm checkpoint config (no \"format\": \"{FORMAT}\")")
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("tokenizer"), dict):
        raise LMError(f"{path}: missing the \"model\" or \"tokenizer\" section")
    return meta


def describe_checkpoint(directory: Path) -> dict:
    """What `lm checkpoints` shows: kinds, size on disk (serving files only) and val loss."""
    meta = read_config(directory)
    size = sum(p.stat().st_size for p in directory.iterdir()  # what serving needs
               if p.is_file() and p.name != TRAIN_STATE_FILE)
    training = meta.get("training", {})
    return {
        "name": directory.name,
        "model": meta["model"]["kind"],
        "tokenizer": meta["tokenizer"]["kind"],
        "params": meta.get("num_params"),
        "size_mb": round(size / 1e6, 1),
        "val_loss": training.get("val_loss"),
        "val_bpc": training.get("val_bpc"),
    }


def describe_shipped() -> list[dict]:
    """`describe_checkpoint` of every shipped checkpoint, by name."""
    return [describe_checkpoint(shipped_dir() / name) for name in shipped_checkpoints()]


def validate_weights(weights: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Read a weights file and check it against `model` (built from config.json): every
    tensor present and none extra, each with the model's shape, a compatible dtype and
    only finite values. Returns the tensors; a bad one is an LMError naming the tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not weights.is_file():
        raise LMError(f"{weights}: missing")
    try:
        state = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LMError(f"{weights}: damaged ({_first_line(exc)})") from exc
    check_weights(state, model, weights)
    return state


def check_weights(state: dict[str, torch.Tensor], model: torch.nn.Module, weights: Path) -> None:
    """The checks of `validate_weights` on tensors already read from `weights`."""
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise LMError(f"{weights}: does not match config.json: unexpected tensor "
                      f"{unexpected[0]!r} (the model has no such weight)")
    for group in _tied_groups(expected):  # safetensors keeps one name of tied weights
        if not any(name in state for name in group):
            raise LMError(f"{weights}: does not match config.json: missing tensor {group[0]!r}")
    for name, tensor in state.items():
        want = expected[name]
        if tensor.shape != want.shape:
            raise LMError(f"{weights}: does not match config.json: tensor {name!r} has shape "
                          f"{list(tensor.shape)}, the model built from config.json has "
                          f"{list(want.shape)}")
        if want.is_floating_point() != tensor.is_floating_point() or (
                not want.is_floating_point() and tensor.dtype != want.dtype):
            raise LMError(f"{weights}: tensor {name!r} has dtype {_dtype(tensor)}, "
                          f"expected {_dtype(want)}")
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise LMError(f"{weights}: tensor {name!r} {_describe_nonfinite(tensor)}; the "
                          "weights are corrupt (retrain, or restore a good copy)")


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no value is NaN or infinite: one sum (NaN and inf propagate), and the
    exact test only when the sum is not finite (it may also overflow)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _tied_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """The names of `state`, grouped by the storage they share (tied weights together)."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr()) if tensor.numel() else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _describe_nonfinite(tensor: torch.Tensor) -> str:
    """E.g. "holds 1 non-finite value (nan at [3, 7])"."""
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    where = [int(i) for i in bad.nonzero()[0]]
    value = tensor[tuple(where)].item()
    plural = "" if count == 1 else "s"
    return f"holds {count:,} non-finite value{plural} ({value} at {where})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_checkpoint(name_or_dir: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a model and its tokenizer for inference (eval mode), without pickle; the
    weights are validated first (`validate_weights`)."""
    directory = resolve(name_or_dir)
    meta = read_config(directory)
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (TypeError, ValueError, LMError) as exc:
        raise LMError(f"{directory / CONFIG_FILE}: bad model config ({exc})") from exc
    tokenizer = load_tokenizer(directory, meta["tokenizer"].get("kind", ""))
    if tokenizer.vocab_size > config.vocab_size:
        raise LMError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} tokens, model only {config.vocab_size}"
        )
    model = build_model(config)
    weights = directory / WEIGHTS_FILE
    state = validate_weights(weights, model)
    model.load_state_dict(state, strict=False)  # validated: only tied copies are absent
    model.to(device).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, path=directory, meta=meta)


def check_checkpoint(name_or_dir: str | Path) -> str | None:
    """What is wrong with a checkpoint (as `load_checkpoint` would say it), or None."""
    try:
        load_checkpoint(name_or_dir)
    except LMError as exc:
        return str(exc)
    return None


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    training: dict | None = None,
) -> None:
    """Write a servable checkpoint into `directory`, each file replaced atomically."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = directory / f".tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        raw_model = getattr(model, "module", model)  # unwrap DistributedDataParallel
        tokenizer.save(tmp)
        save_model(raw_model, str(tmp / WEIGHTS_FILE))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": raw_model.config.to_dict(),
            "num_params": raw_model.num_params(),
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
            "training": training or {},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        names = [p.name for p in tmp.iterdir() if p.name != CONFIG_FILE] + [CONFIG_FILE]
        for name in names:
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_train_state(path: Path) -> dict:
    """Read resume state with `weights_only=True`: a pickle payload is refused, not run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LMError(f"{path}: cannot be read safely ({_first_line(exc)})") from exc
