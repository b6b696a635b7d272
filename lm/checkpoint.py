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


def load_checkpoint(name_or_dir: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a model and its tokenizer for inference (eval mode), without pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    directory = resolve(name_or_dir)
    if (directory / "adapter_config.json").is_file() and not (directory / CONFIG_FILE).is_file():
        from lm.lora import load_adapter_checkpoint  # a LoRA adapter: its base, merged

        return load_adapter_checkpoint(directory, device)
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
    if not weights.is_file():
        raise LMError(f"{weights}: missing")
    try:
        load_model(model, str(weights), strict=True, device="cpu")
    except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LMError(f"{weights}: damaged or does not match config.json ({first_line})") from exc
    model.to(device).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, path=directory, meta=meta)


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
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LMError(f"{path}: cannot be read safely ({first_line})") from exc
