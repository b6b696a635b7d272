"""Training: next-token cross-entropy, AdamW (or Muon for the hidden matrices), clipping,
warm-up + cosine decay or warm-down, a step and a wall-clock budget, evaluation,
best-checkpoint keeping, exact resume, and data parallel under `torchrun`."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from lm.checkpoint import (
    CONFIG_FILE,
    TRAIN_STATE_FILE,
    DiskFull,
    atomic_torch_save,
    is_disk_full,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
)
from lm.data import (
    IGNORE,
    Streams,
    WindowSampler,
    corpus_hash,
    open_tokens,
    read_corpus,
    read_loss_mask,
    split_text,
    to_tensor,
    token_file,
)
from lm.device import pick_device
from lm.errors import LMError
from lm.evaluate import evaluate
from lm.finetune import describe_unknowns, encode_corpus, init_unknown_row, unknown_tokens
from lm.finetune import report as report_unknown
from lm.lora import ADAPTER_CONFIG, add_lora, base_info, save_adapter, update_adapter_training
from lm.models import ModelConfig, build_model
from lm.native import bf16_matmul_is_fast
from lm.optim import Muon
from lm.plotting import pyplot
from lm.tokenizers import Tokenizer, load_tokenizer, tokenizer_class, train_tokenizer

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
MAX_NONFINITE_IN_A_ROW = 10  # --skip-nonfinite gives up after this many: the model is broken
logger = logging.getLogger(__name__)


def read_recipe(path: str | Path) -> dict:
    """A recipe.toml as TrainConfig keys (dashes or underscores)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise LMError(f"--config {path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise LMError(f"--config {path}: not valid TOML ({exc})") from exc
    return {k.replace("-", "_"): v for k, v in data.items()}


@dataclass
class TrainConfig:
    corpus: list[str] = field(default_factory=list)
    # Loss on marked characters only (char tokenizer): one mask file per corpus file, one
    # byte per character, 1 where the character is a target that counts (lm make-tasks
    # --mask marks the answers). Validation loss is then the marked targets' loss too.
    loss_mask: list[str] | None = None
    out: str = "runs/model"
    tokenizer: str = "char"
    vocab_size: int | None = None
    model: str = "gpt"
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    block_size: int = 64
    batch_size: int = 12  # per process and micro-step
    grad_accum_steps: int = 1  # micro-batches summed into each optimizer step
    dropout: float = 0.0
    attn_dropout: float | None = None  # on attention probabilities; None = dropout
    bias: bool = False
    position: str = "learned"  # GPT block options: see lm.models.ModelConfig
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    qk_norm: bool = False
    mlp: str = "gelu"
    mlp_hidden: int | None = None
    tie_embeddings: bool = True
    zero_init_proj: bool = False
    logit_softcap: float = 0.0
    optimizer: str = "adamw"  # or "muon": Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak lr (scaled per matrix by sqrt(max(1, rows/cols)))
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    schedule: str = "cosine"  # or "warmdown": constant, then linear to 0 at the end
    warmdown_frac: float = 0.3  # the last fraction of the run that "warmdown" decays over
    max_time: float | None = None  # seconds of training (evaluation included) before stopping
    # "float32", "bfloat16" (autocast), "auto" (bfloat16 on CUDA only) or "best" (bfloat16
    # on CUDA and on CPUs that multiply it in hardware: AVX512-BF16 or AMX; else float32).
    dtype: str = "auto"
    compile: bool = False  # torch.compile the model for training
    lr: float = 1e-3
    min_lr: float | None = None  # default lr / 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    warmup_steps: int = 100
    max_steps: int = 2000
    eval_interval: int = 250
    eval_tokens: int | None = None  # cap on validation tokens per periodic evaluation
    val_fraction: float = 0.1
    seed: int = 1337
    device: str = "auto"
    threads: int | None = None
    resume: bool = False
    skip_nonfinite: bool = False  # skip a batch whose loss is NaN/inf instead of stopping
    # Fine-tuning (lm.finetune, lm.lora): start from a checkpoint, with its tokenizer and
    # architecture (the model flags above do not apply); unknown characters or words are
    # mapped to <unk> or dropped. A LoRA rank trains low-rank adapters of the frozen parent.
    init_from: str | None = None
    unknown: str = "map"
    lora_rank: int | None = None
    lora_alpha: float | None = None  # default 2 x rank
    lora_targets: str = "c_attn,c_proj,c_fc"

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise LMError(f"unknown training setting(s): {', '.join(unknown)}")
        config = cls(**data)
        if isinstance(config.corpus, str):
            config.corpus = [config.corpus]
        if isinstance(config.loss_mask, str):
            config.loss_mask = [config.loss_mask]
        return config

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            kind=self.model,
            vocab_size=vocab_size,
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_head=self.n_head,
            block_size=self.block_size,
            dropout=self.dropout,
            bias=self.bias,
            **{name: getattr(self, name) for name in GPT_OPTIONS},
        )

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum_steps", "max_steps", "eval_interval"):
            if getattr(self, name) < 1:
                raise LMError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise LMError("--lr must be positive")
        if self.warmup_steps < 0:
            raise LMError("--warmup-steps must not be negative")
        choices = {
            "optimizer": ("adamw", "muon"),
            "schedule": ("cosine", "warmdown"),
            "dtype": ("auto", "best", "float32", "bfloat16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LMError(
                    f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.optimizer == "muon" and self.model != "gpt":
            raise LMError("--optimizer muon is for GPT models; use adamw for recurrent ones")
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1:
            raise LMError("--muon-lr must be positive and --muon-momentum in [0, 1)")
        if not 0 < self.warmdown_frac <= 1:
            raise LMError(f"--warmdown-frac must be in (0, 1], got {self.warmdown_frac}")
        if self.max_time is not None and self.max_time <= 0:
            raise LMError("--max-time must be a positive number of seconds")
        if self.unknown not in ("map", "drop"):
            raise LMError(f"--unknown must be map or drop, got {self.unknown!r}")
        if self.lora_rank is not None:
            if self.init_from is None:
                raise LMError(
                    "--lora-rank trains adapters of a trained model: add --init-from CHECKPOINT"
                )
            if self.optimizer != "adamw":
                raise LMError("--lora-rank trains with --optimizer adamw")
        tokenizer_class(self.tokenizer)  # an unknown kind is an LMError naming the choices
        self.model_config(vocab_size=max(self.vocab_size or 1, 1))  # validates the model fields


GPT_OPTIONS = (
    "attn_dropout",
    "position",
    "rope_theta",
    "norm",
    "qk_norm",
    "mlp",
    "mlp_hidden",
    "tie_embeddings",
    "zero_init_proj",
    "logit_softcap",
)


def lr_at(step: int, config: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warm-up to `lr` over `warmup_steps` steps; then cosine decay to `min_lr` at
    `max_steps`, or ("warmdown") `lr` until the last `warmdown_frac` and a straight line to 0.

    The decay follows `effective_step`: under a time budget, the clock when it is further
    along than the step count. The warm-up counts steps only (optimizer stability is a
    matter of steps, and with a time budget `max_steps` is often just a loose cap)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    step = effective_step(step, elapsed, config)
    if config.schedule == "warmdown":
        left = (config.max_steps - step) / (config.warmdown_frac * config.max_steps)
        return config.lr * max(0.0, min(1.0, left))
    min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (config.lr - min_lr)


def effective_step(step: int, elapsed: float, config: TrainConfig) -> float:
    """Where the run is in its schedule: `max_steps` times the larger of the fraction of
    steps and (with `max_time`) the fraction of the time budget spent."""
    if config.max_time is None:
        return step
    return max(step, config.max_steps * min(1.0, elapsed / config.max_time))


class Trainer:
    """Trains one model; writes its checkpoint, metrics and loss curve to `config.out`."""

    def __init__(self, config: TrainConfig, progress: bool = True):
        config.validate()
        self.config = config
        self.progress = progress
        self.out = Path(config.out)
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.is_main = self.rank == 0
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = pick_device(config.device)
        if self.world_size > 1 and self.device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if local_rank >= torch.cuda.device_count():
                raise LMError(
                    f"process {local_rank} of this node has no GPU: torchrun started more "
                    f"processes per node than the {torch.cuda.device_count()} CUDA devices "
                    "here; use --nproc_per_node with at most that many, or --device cpu"
                )
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)

        resuming = config.resume and (self.out / TRAIN_STATE_FILE).is_file()
        if not resuming and any(
            (self.out / name).exists() for name in (CONFIG_FILE, ADAPTER_CONFIG)
        ):
            raise LMError(
                f"{self.out} already holds a checkpoint; pass --resume to continue it "
                "or choose another --out"
            )
        if config.resume and not resuming:
            raise LMError(f"--resume: {self.out / TRAIN_STATE_FILE} not found; nothing to resume")

        text = read_corpus(config.corpus)
        train_text, val_text = split_text(text, config.val_fraction)
        self.corpus_hash = corpus_hash(text)
        self.parent = load_checkpoint(config.init_from) if config.init_from else None
        if self.parent is not None:
            self.tokenizer: Tokenizer = self.parent.tokenizer
            config.tokenizer = self.tokenizer.kind
        elif resuming:
            self.tokenizer = load_tokenizer(self.out, config.tokenizer)
        else:
            self.tokenizer = train_tokenizer(config.tokenizer, train_text, config.vocab_size)
        self.unknown = unknown_tokens(self.tokenizer, train_text) + unknown_tokens(
            self.tokenizer, val_text
        )
        if self.unknown and self.is_main:
            unit = "character" if self.tokenizer.kind == "char" else "word"
            total = len(text) if unit == "character" else len(self.tokenizer.split(text))
            report_unknown(describe_unknowns(self.unknown, total, config.unknown, unit))
        self.train_mask = self.val_mask = None
        if config.loss_mask:
            if self.tokenizer.kind != "char":
                raise LMError(
                    "--loss-mask marks characters: it needs the char tokenizer "
                    f"(this run's is {self.tokenizer.kind})"
                )
            if self.unknown and config.unknown == "drop":
                raise LMError("--loss-mask needs --unknown map: dropped characters misalign it")
            mask = read_loss_mask(config.loss_mask, config.corpus)
            self.train_mask, self.val_mask = mask[: len(train_text)], mask[len(train_text) :]
            if not self.train_mask[1:].any() or not self.val_mask[1:].any():
                split = "training" if not self.train_mask[1:].any() else "validation"
                raise LMError(f"the loss mask marks no character of the {split} split")
        if self.unknown and config.unknown == "drop":  # token files hold plain encodings
            train_ids, _ = encode_corpus(self.tokenizer, train_text, config.unknown)
            val_ids, _ = encode_corpus(self.tokenizer, val_text, config.unknown)
            self.train_ids, self.val_ids = to_tensor(train_ids), to_tensor(val_ids)
        else:  # unknowns (if any) are <unk> in the encoding itself
            self.train_ids, self.val_ids = self._token_files(train_text, val_text)
        self.val_chars = len(val_text)
        if self.train_mask is not None and (
            len(self.train_mask) != len(self.train_ids) or len(self.val_mask) != len(self.val_ids)
        ):  # the char tokenizer writes one token per character; anything else is a bug
            raise LMError("the loss mask does not align with the corpus's tokens")
        del text, train_text, val_text
        need = config.block_size + 2
        if len(self.train_ids) < need or len(self.val_ids) < 2:
            raise LMError(
                f"corpus too short: {len(self.train_ids)} training tokens for a block of "
                f"{config.block_size}; use a longer corpus or a smaller --block-size"
            )

        torch.manual_seed(config.seed)
        if self.parent is None:
            self.model_config = config.model_config(self.tokenizer.vocab_size)
            self.model = build_model(self.model_config)
        else:
            self.model_config, self.model = self.parent.config, self.parent.model.train()
            if config.block_size > (self.model.context_size or config.block_size):
                raise LMError(
                    f"--block-size {config.block_size} exceeds the parent's context "
                    f"of {self.model.context_size} tokens"
                )
            if (
                self.unknown
                and config.unknown == "map"
                and not resuming
                and config.lora_rank is None
            ):  # an adapter must fit the parent as is
                init_unknown_row(self.model)
        if config.lora_rank is not None:
            alpha = config.lora_alpha or 2.0 * config.lora_rank
            targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
            add_lora(self.model, config.lora_rank, alpha, targets)
        self.model.to(self.device)
        self.trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if self.world_size > 1:
            torch.manual_seed(config.seed + self.rank)  # each rank its own dropout
        self.optimizers = self._make_optimizers()
        self.generator = torch.Generator().manual_seed(config.seed)  # alike on every rank
        self.sampler = WindowSampler(
            self.train_ids,
            config.block_size,
            config.batch_size,
            self.generator,
            self.rank,
            self.world_size,
            config.grad_accum_steps,
            self.train_mask,
        )
        self.streams = None
        if self.model_config.kind != "gpt":
            shard = len(self.train_ids) // self.world_size  # each rank reads its own part
            own = slice(self.rank * shard, (self.rank + 1) * shard + 1)
            own_mask = None if self.train_mask is None else self.train_mask[own]
            self.streams = Streams(
                self.train_ids[own], config.block_size, config.batch_size, own_mask
            )
        self.rnn_state = None
        self.step = 0
        self.best_val = float("inf")
        self.best_step = -1
        self.elapsed = 0.0  # training and evaluation time, across resumes
        self.eval_seconds = 0.0  # evaluation time in this process
        self.history: list[dict] = []
        self.nonfinite_in_a_row = 0
        if resuming:
            self._restore(load_train_state(self.out / TRAIN_STATE_FILE))

        self.ddp_model = self.model
        self.ddp = None
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if config.compile:
            self.ddp_model = torch.compile(self.ddp_model)

    def _token_files(self, train_text: str, val_text: str) -> tuple:
        """Both splits as memory-mapped token files (`lm.data.token_file`), keyed by corpus
        hash, split and tokenizer; under DDP each machine's first process writes them."""
        key = f"{self.corpus_hash.split(':')[-1]}-val{self.config.val_fraction:g}"
        local_main = int(os.environ.get("LOCAL_RANK", "0")) == 0
        paths = None
        if local_main:
            paths = [
                token_file(self.tokenizer, text, f"{key}-{split}")
                for split, text in (("train", train_text), ("val", val_text))
            ]
        barrier()
        if paths is None:
            paths = [
                token_file(self.tokenizer, text, f"{key}-{split}")  # there by now
                for split, text in (("train", train_text), ("val", val_text))
            ]
        return open_tokens(paths[0]), open_tokens(paths[1])

    def _make_optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW for everything; or Muon for the blocks' 2-D matrices and AdamW for the
        embeddings, the output layer, norms and biases. Each group keeps its peak lr as
        `base_lr`; the schedule scales all of them alike."""
        config = self.config
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        hidden = []
        if config.optimizer == "muon":
            hidden = [p for name, p in named if p.dim() == 2 and name.startswith("blocks.")]
        rest = [p for _, p in named if all(p is not h for h in hidden)]
        groups = [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizers: list[torch.optim.Optimizer] = [
            torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))
        ]
        if hidden:
            optimizers.append(
                Muon(
                    hidden,
                    lr=config.muon_lr,
                    momentum=config.muon_momentum,
                    weight_decay=config.muon_weight_decay,
                )
            )
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["base_lr"] = group["lr"]
        return optimizers

    # -- resume ---------------------------------------------------------------------------

    def _rank_state(self) -> dict:
        """This process's own random state and data position."""
        state = {"generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.streams is not None:
            state["stream_position"] = self.streams.position
        if self.rnn_state is not None:
            state["rnn_state"] = {k: v.detach().cpu() for k, v in self.rnn_state.items()}
        return state

    def _gather_rank_states(self) -> list[dict] | None:
        """Every rank's `_rank_state`, in rank order, on rank 0 (None elsewhere); under DDP a
        collective, so every rank calls it at the same step."""
        if self.world_size == 1:
            return [self._rank_state()]
        import torch.distributed as dist

        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(self._rank_state(), gathered, dst=0)
        return gathered

    def _train_state(self, ranks: list[dict] | None = None) -> dict:
        return {
            "step": self.step,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "world_size": self.world_size,
            "ranks": ranks or [self._rank_state()],  # each rank's RNG and data position
            "best_val": self.best_val,
            "best_step": self.best_step,
            "elapsed": self.elapsed,
            "model_config": json.dumps(self.model_config.to_dict()),
        }

    def _restore_rank(self, state: dict) -> None:
        """Restore this rank's own entry of `state["ranks"]` (older files: one, at the top)."""
        ranks = state.get("ranks", [state])
        saved_world = state.get("world_size", len(ranks))
        if saved_world != self.world_size:
            raise LMError(
                f"--resume: {self.out} was trained by {saved_world} process(es), this run has "
                f"{self.world_size}; resume with the same number of processes in all "
                "(torchrun's --nnodes x --nproc-per-node)"
            )
        own = ranks[self.rank]
        self.generator.set_state(own["generator"])
        torch.set_rng_state(own["torch_rng"])
        if "cuda_rng" in own and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda_rng"], self.device)
        if self.streams is not None:
            self.streams.position = int(own["stream_position"])
        if "rnn_state" in own:
            self.rnn_state = {k: v.to(self.device) for k, v in own["rnn_state"].items()}

    def _restore(self, state: dict) -> None:
        saved = json.loads(state["model_config"])
        if saved != self.model_config.to_dict():
            raise LMError(
                f"--resume: {self.out} was trained with a different model config ({saved}); "
                "use the same settings or another --out"
            )
        self.model.load_state_dict(state["model"])
        saved_optimizers = state.get("optimizers") or [state["optimizer"]]  # older files: one
        if len(saved_optimizers) != len(self.optimizers):
            raise LMError(
                f"--resume: {self.out} was trained with another --optimizer; "
                "use the same settings or another --out"
            )
        for optimizer, saved_state in zip(self.optimizers, saved_optimizers):
            optimizer.load_state_dict(saved_state)
        self._restore_rank(state)
        self.step = int(state["step"])
        self.best_val = float(state["best_val"])
        self.best_step = int(state["best_step"])
        self.elapsed = float(state["elapsed"])
        # Steps after the saved one will be run again: drop their records.
        metrics = self.out / METRICS_FILE
        if metrics.is_file() and self.is_main:
            kept = [r for r in _read_jsonl(metrics) if r.get("step", 0) <= self.step]
            self.history = kept
            _write_jsonl(metrics, kept)

    # -- loop -----------------------------------------------------------------------------

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if self.streams is None:
            x, y = self.sampler.next()
            return x, y, False
        return self.streams.next()

    def _accumulate_gradients(self) -> torch.Tensor:
        """Forward and backward over `grad_accum_steps` micro-batches (DDP synchronises the
        gradients on the last one only); the mean loss over every rank's micro-batches."""
        steps = self.config.grad_accum_steps
        total = torch.zeros((), device=self.device)
        for micro in range(steps):
            last = micro == steps - 1
            with nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                x, y, restart = self._batch()
                loss = self._loss(x.to(self.device), y.to(self.device), restart) / steps
                if not self._finite(loss):  # stops the run, or (--skip-nonfinite) the step
                    for optimizer in self.optimizers:
                        optimizer.zero_grad(set_to_none=True)
                    return loss.detach() * steps
                loss.backward()
            total += loss.detach()
        if self.world_size > 1:  # every rank logs (and stops on) the global batch's loss
            import torch.distributed as dist

            dist.all_reduce(total)
            total /= self.world_size
        return total

    def _loss(self, x: torch.Tensor, y: torch.Tensor, restart: bool) -> torch.Tensor:
        dtype, cuda = self.config.dtype, self.device.type == "cuda"
        bf16 = (
            dtype == "bfloat16"
            or (dtype == "auto" and cuda)
            or (dtype == "best" and (cuda or bf16_matmul_is_fast()))
        )
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        with autocast:
            if self.streams is None:
                logits = self.ddp_model(x)
            else:
                state = None if restart or self.rnn_state is None else self.rnn_state
                logits, new_state = self.ddp_model(x, state, return_state=True)
                self.rnn_state = {k: v.detach() for k, v in new_state.items()}
            logits, y = logits.flatten(0, 1).float(), y.flatten()
            if self.train_mask is None:
                return F.cross_entropy(logits, y)
            # the mean over the targets that count; 0 for a batch without any (not NaN)
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")
            return loss / (y != IGNORE).sum().clamp(min=1)

    def _finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite (on every rank). If not, stop the run before the
        update (the saved checkpoint stays the last good one), or with --skip-nonfinite skip
        the batch, up to MAX_NONFINITE_IN_A_ROW in a row."""
        finite = torch.isfinite(loss.detach()).float()
        if self.world_size > 1:  # every rank must take the same branch
            import torch.distributed as dist

            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if bool(finite):
            self.nonfinite_in_a_row = 0
            return True
        step, value = self.step + 1, loss.item()
        self.nonfinite_in_a_row += 1
        kept = (
            f"the checkpoint in {self.out} (best at step {self.best_step}) is kept"
            if self.best_step >= 0
            else "no checkpoint was saved yet"
        )
        if not self.config.skip_nonfinite:
            raise LMError(
                f"training stopped: the loss is {value} at step {step}; {kept}. "
                "Lower --lr or --grad-clip and --resume, or pass --skip-nonfinite"
            )
        if self.nonfinite_in_a_row > MAX_NONFINITE_IN_A_ROW:
            raise LMError(
                f"training stopped: the loss was not finite for "
                f"{self.nonfinite_in_a_row} steps in a row (up to step {step}); {kept}"
            )
        logger.warning("step %d: the loss is %s; batch skipped (--skip-nonfinite)", step, value)
        return False

    def _time_spent(self) -> bool:
        """Whether the `max_time` budget is used up; under DDP every rank takes rank 0's
        clock, so that all ranks run the same lr and stop at the same step."""
        if self.config.max_time is None:
            return False
        if self.world_size > 1:
            import torch.distributed as dist

            clock = torch.tensor([self.elapsed], dtype=torch.float64)
            dist.broadcast(clock, 0)
            self.elapsed = float(clock.item())
        return self.elapsed >= self.config.max_time

    def train(self, stop_at: int | None = None) -> dict:
        """Run until `max_steps` or `max_time` (or `stop_at`, for tests of resume); return
        the summary."""
        config = self.config
        end = config.max_steps if stop_at is None else min(stop_at, config.max_steps)
        tokens_per_step = (
            config.batch_size * config.block_size * self.world_size * config.grad_accum_steps
        )
        bar = None
        if self.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        self.model.train()
        window_start, window_tokens = time.perf_counter(), 0
        out_of_time = self._time_spent()
        last_eval = -1
        while self.step < end and not out_of_time:
            lr = lr_at(self.step, config, self.elapsed)
            for optimizer in self.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr / config.lr
            step_start = time.perf_counter()
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss = self._accumulate_gradients()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            for optimizer in self.optimizers:
                optimizer.step()
            self.step += 1
            loss_value = loss.item()
            self.elapsed += time.perf_counter() - step_start
            window_tokens += tokens_per_step
            if bar is not None:
                rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{rate:,.0f}", lr=f"{lr:.2e}")
            out_of_time = self._time_spent()
            if self.step % 10 == 0 or self.step == end or out_of_time:
                rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                self._log(
                    {
                        "step": self.step,
                        "train_loss": loss_value,
                        "lr": lr,
                        "tokens_per_s": rate,
                        "elapsed_s": self.elapsed,
                    }
                )
                window_start, window_tokens = time.perf_counter(), 0
            if (
                self.step % config.eval_interval == 0
                or self.step == config.max_steps
                or out_of_time
            ):
                self._evaluate_and_save(bar)
                last_eval = self.step
        if out_of_time and last_eval != self.step:  # a resumed run whose budget was spent
            self._evaluate_and_save(bar)
        if bar is not None:
            bar.close()
        if (self.step >= config.max_steps or out_of_time) and self.is_main:
            return self.finish()
        return {"step": self.step, "best_val_loss": self.best_val}

    def _evaluate_and_save(self, bar) -> None:
        ranks = self._gather_rank_states()  # a collective: before the other ranks leave
        if not self.is_main:
            return
        t0 = time.perf_counter()
        result = evaluate(
            self.model,
            self.val_ids,
            self.val_chars,
            self.config.eval_tokens,
            self.device,
            self.val_mask,
        )
        self.elapsed += time.perf_counter() - t0
        self.eval_seconds += time.perf_counter() - t0
        record = {
            "step": self.step,
            "val_loss": result["loss"],
            "val_perplexity": result["perplexity"],
            "val_bpc": result["bpc"],
            "elapsed_s": self.elapsed,
        }
        self._log(record)
        message = (
            f"step {self.step}: val loss {result['loss']:.4f}, "
            f"ppl {result['perplexity']:.2f}, bpc {result['bpc']:.3f}"
        )
        if bar is not None:
            bar.write(message)
        if result["loss"] < self.best_val:
            self.best_val, self.best_step = result["loss"], self.step
            self._save(self.model, self._summary(result))
        atomic_torch_save(self._train_state(ranks), self.out / TRAIN_STATE_FILE)
        self._plot()

    def _summary(self, result: dict, full: bool = False) -> dict:
        corpus_names = [Path(p).name for p in self.config.corpus]
        return {
            "corpus": corpus_names,  # portable: names and corpus_hash, never this machine's paths
            "corpus_hash": self.corpus_hash,
            "val_fraction": self.config.val_fraction,
            "step": self.step,
            "max_steps": self.config.max_steps,
            "max_time": self.config.max_time,
            "val_loss": result["loss"],
            "val_perplexity": result["perplexity"],
            "val_bpc": result["bpc"],
            "val_tokens": result["tokens"],
            "val_full_split": full or self.config.eval_tokens is None,
            "train_seconds": round(self.elapsed, 1),
            "device": str(self.device),
            "world_size": self.world_size,
            "threads": torch.get_num_threads(),
            "settings": {k: v for k, v in asdict(self.config).items() if k != "resume"}
            | {"corpus": corpus_names}
            | (
                {"loss_mask": [Path(p).name for p in self.config.loss_mask]}
                if self.config.loss_mask
                else {}
            )
            | ({"init_from": self.parent.name} if self.parent is not None else {}),
            "trainable_params": self.trainable_params,
            **self._lineage(),
        }

    def _lineage(self) -> dict:
        """The parent (name, path, weights hash) and the unknown tokens, when fine-tuning."""
        if self.parent is None:
            return {}
        unknown = {
            "count": sum(self.unknown.values()),
            "distinct": len(self.unknown),
            "examples": [t for t, _ in self.unknown.most_common(8)],
            "mode": self.config.unknown,
        }
        return {"parent": self.parent_info, "unknown_tokens": unknown}

    @property
    def parent_info(self) -> dict:
        if not hasattr(self, "_parent_info"):
            self._parent_info = base_info(self.parent.path)
        return self._parent_info

    def _save(self, model: torch.nn.Module, summary: dict) -> None:
        """A checkpoint, or for LoRA the adapter directory (naming the parent)."""
        if self.config.lora_rank is not None:
            save_adapter(self.out, model, self.parent_info, summary)
        else:
            save_checkpoint(self.out, model, self.tokenizer, summary)

    def finish(self) -> dict:
        """Evaluate the best checkpoint on the whole validation split and record it."""
        from lm.checkpoint import load_checkpoint

        best = load_checkpoint(self.out, self.device)
        result = evaluate(
            best.model, self.val_ids, self.val_chars, None, self.device, self.val_mask
        )
        summary = dict(
            best.training,
            **{
                "val_loss": result["loss"],
                "val_perplexity": result["perplexity"],
                "val_bpc": result["bpc"],
                "val_tokens": result["tokens"],
                "val_full_split": True,
                "train_seconds": round(self.elapsed, 1),
                "finished": True,
            },
        )
        if self.config.lora_rank is not None:  # `best` is merged: keep the adapter's files
            update_adapter_training(self.out, summary)
        else:
            save_checkpoint(self.out, best.model, self.tokenizer, summary)
        return summary

    # -- records --------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.history.append(record)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _plot(self) -> None:
        try:
            plt = pyplot()
        except LMError as exc:  # training never fails for want of a picture
            if not getattr(self, "_plot_skipped", False):
                logger.warning("%s; %s not written", exc, PLOT_FILE)
                self._plot_skipped = True
            return
        train = [(r["step"], r["train_loss"]) for r in self.history if "train_loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.history if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train", alpha=0.7)
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{self.model_config.kind} on {self.config.tokenizer} tokens")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.out / (PLOT_FILE + ".tmp.png")
        try:
            fig.savefig(tmp, dpi=100)
            os.replace(tmp, self.out / PLOT_FILE)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            plt.close(fig)


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash ends the record
    return records


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def process_group(config: TrainConfig) -> Iterator[None]:
    """The torch.distributed process group when run under torchrun (WORLD_SIZE > 1): gloo on
    CPU, NCCL on CUDA; nothing otherwise. Drop the Trainer inside the block: on leaving, the
    group is destroyed after a garbage collection."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield
        return
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo"
    dist.init_process_group(backend)
    try:
        yield
    finally:
        # DDP and its pending work go before the process group: gloo threads still
        # holding tensors at interpreter exit abort the process.
        gc.collect()
        dist.destroy_process_group()


def run_training(config: TrainConfig, progress: bool = True, stop_at: int | None = None) -> dict:
    """Train, under torchrun if WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA); `stop_at` stops
    early, as an interruption would (for tests of resume). A full disk stops the run with one
    LMError (the last complete checkpoint stays resumable)."""
    try:
        return _run_training(config, progress, stop_at)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        error = exc if isinstance(exc, DiskFull) else DiskFull(Path(config.out))
        if (Path(config.out) / TRAIN_STATE_FILE).is_file():
            advice = (
                f"the last complete checkpoint in {config.out} is kept: free some space, "
                "then continue with --resume"
            )
        else:
            advice = "nothing resumable was saved yet: free some space, then start again"
        raise LMError(f"{error}; {advice}") from exc


def _run_training(config: TrainConfig, progress: bool, stop_at: int | None) -> dict:
    with process_group(config):
        trainer = Trainer(config, progress=progress)
        summary = trainer.train(stop_at)
        barrier()  # the other ranks wait while rank 0 evaluates and saves
        del trainer
    return summary


def barrier() -> None:
    """Wait for every rank, under torchrun; nothing in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
