"""Save and load checkpoint directories: config.json, model.safetensors, tokenizer files.

Loading uses JSON and safetensors only (no pickle) and validates every tensor against
config.json. Saving writes every file to a temporary directory first and then moves each
into place, weights before config, so a crash at any moment leaves a loadable checkpoint;
a full disk is one `DiskFull` error, with the temporary files removed.
"""

from __future__ import annotations

import errno
import io
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
    raise LMError(
        f"no checkpoint {str(name_or_dir)!r}: not a directory nor a shipped name ({names})"
    )


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
        raise LMError(f'{path}: not an lm checkpoint config (no "format": "{FORMAT}")')
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("tokenizer"), dict):
        raise LMError(f'{path}: missing the "model" or "tokenizer" section')
    return meta


def describe_checkpoint(directory: Path) -> dict:
    """What `lm checkpoints` shows: kinds, size on disk (serving files only) and val loss."""
    meta = read_config(directory)
    size = sum(
        p.stat().st_size
        for p in directory.iterdir()  # what serving needs
        if p.is_file() and p.name != TRAIN_STATE_FILE
    )
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
        raise LMError(
            f"{weights}: does not match config.json: unexpected tensor "
            f"{unexpected[0]!r} (the model has no such weight)"
        )
    for group in _tied_groups(expected):  # safetensors keeps one name of tied weights
        if not any(name in state for name in group):
            raise LMError(f"{weights}: does not match config.json: missing tensor {group[0]!r}")
    for name, tensor in state.items():
        want = expected[name]
        if tensor.shape != want.shape:
            raise LMError(
                f"{weights}: does not match config.json: tensor {name!r} has shape "
                f"{list(tensor.shape)}, the model built from config.json has "
                f"{list(want.shape)}"
            )
        if want.is_floating_point() != tensor.is_floating_point() or (
            not want.is_floating_point() and tensor.dtype != want.dtype
        ):
            raise LMError(
                f"{weights}: tensor {name!r} has dtype {_dtype(tensor)}, expected {_dtype(want)}"
            )
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise LMError(
                f"{weights}: tensor {name!r} {_describe_nonfinite(tensor)}; the "
                "weights are corrupt (retrain, or restore a good copy)"
            )


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


def load_checkpoint(
    name_or_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Checkpoint:
    """Load a model and its tokenizer for inference (eval mode), without pickle; the
    weights are validated first (`validate_weights`). `dtype`: cast the weights (None:
    as saved, float32)."""
    directory = resolve(name_or_dir)
    if (directory / "adapter_config.json").is_file() and not (directory / CONFIG_FILE).is_file():
        from lm.lora import load_adapter_checkpoint  # a LoRA adapter: its base, merged

        return load_adapter_checkpoint(directory, device, dtype)
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
    model.to(device=device, dtype=dtype).eval()
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
    """Write a servable checkpoint into `directory`, each file replaced atomically; on a
    full disk, `DiskFull` and the previous files untouched."""
    from safetensors.torch import save_model

    directory = Path(directory)
    tmp = directory / f".tmp-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".tmp-*"):  # left by a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
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
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFull(directory) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_torch_save(obj, path: Path) -> None:
    """`torch.save` to `path` through a temporary file; a full disk is `DiskFull`, and the
    temporary file is removed on any failure."""
    tmp = path.with_name(path.name + ".tmp")
    buffer = io.BytesIO()  # serialised first: then a failed write is a plain OSError
    torch.save(obj, buffer)
    try:
        _write_file(tmp, buffer.getbuffer())
        os.replace(tmp, path)
    except BaseException as exc:
        full = DiskFull(path) if is_disk_full(exc) else None  # free space before cleaning up
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from exc
        raise


def _write_file(path: Path, data) -> None:
    with open(path, "wb") as f:
        f.write(data)


# -- a full disk ----------------------------------------------------------------------------

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# Libraries that wrap the OSError keep only its text (safetensors: "... (os error 28)").
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


class DiskFull(LMError):
    """No space left to write `path`: says where (the file system) and how much is free."""

    def __init__(self, path: Path):
        self.path = Path(path)
        mount = mount_point(self.path)
        try:
            usage = shutil.disk_usage(mount)
            room = f"{_size(usage.free)} free of {_size(usage.total)}"
        except OSError:
            room = "free space unknown"
        super().__init__(f"disk full: no space left on {mount} to write {self.path} ({room})")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it came from, is a full disk or quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(exc) for text in _DISK_FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def mount_point(path: Path) -> Path:
    """The mount point of the file system that holds (or would hold) `path`."""
    path = Path(os.path.abspath(path))
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def load_train_state(path: Path) -> dict:
    """Read resume state with `weights_only=True`: a pickle payload is refused, not run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LMError(f"{path}: cannot be read safely ({_first_line(exc)})") from exc
