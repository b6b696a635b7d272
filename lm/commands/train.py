"""`lm train`: train a model on a corpus; flags override the keys of a recipe.toml."""

from __future__ import annotations

import argparse
from pathlib import Path

from lm.commands._args import positive_int
from lm.models import MODELS
from lm.tokenizers import TOKENIZERS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a language model on a text corpus",
        description="Train a model; flags override the keys of --config.",
    )
    p.add_argument("--config", help="recipe.toml with the same keys as these flags")
    p.add_argument("--corpus", action="append", help="UTF-8 text file (repeatable)")
    p.add_argument(
        "--loss-mask",
        action="append",
        metavar="PATH",
        help="loss on marked characters only (char tokenizer): one byte per corpus "
        "character, 1 = counts (lm make-tasks --mask); one per --corpus, in order",
    )
    p.add_argument("--out", help="checkpoint directory to write (default runs/model)")
    p.add_argument("--tokenizer", choices=list(TOKENIZERS))
    p.add_argument("--vocab-size", type=positive_int)
    p.add_argument("--model", choices=list(MODELS))
    p.add_argument("--n-layer", type=positive_int)
    p.add_argument("--n-embd", type=positive_int)
    p.add_argument("--n-head", type=positive_int)
    p.add_argument("--block-size", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument(
        "--grad-accum-steps",
        type=positive_int,
        help="micro-batches of --batch-size per optimizer step (1)",
    )
    p.add_argument("--dropout", type=float)
    p.add_argument(
        "--attn-dropout", type=float, help="dropout on attention probabilities (default: --dropout)"
    )
    p.add_argument("--position", choices=["learned", "rope"], help="GPT positions (learned)")
    p.add_argument("--rope-theta", type=float, help="rotary base (10000)")
    p.add_argument("--norm", choices=["layernorm", "rmsnorm"], help="GPT norm (layernorm)")
    p.add_argument(
        "--qk-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="RMSNorm per head on queries and keys",
    )
    p.add_argument("--mlp", choices=["gelu", "relu2", "swiglu"], help="GPT MLP (gelu)")
    p.add_argument("--mlp-hidden", type=positive_int, help="MLP width (4x; swiglu 8/3x)")
    p.add_argument(
        "--tie-embeddings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="output layer shares the token embedding (default yes)",
    )
    p.add_argument(
        "--zero-init-proj",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="zero-initialise the blocks' output projections",
    )
    p.add_argument("--logit-softcap", type=float, help="cap*tanh(logits/cap); 0 = off")
    p.add_argument(
        "--optimizer",
        choices=["adamw", "muon"],
        help="muon: Muon for the blocks' matrices, AdamW for the rest",
    )
    p.add_argument("--muon-lr", type=float, help="Muon's peak lr (0.02)")
    p.add_argument("--muon-momentum", type=float)
    p.add_argument("--muon-weight-decay", type=float)
    p.add_argument(
        "--schedule",
        choices=["cosine", "warmdown"],
        help="after warm-up: cosine to --min-lr, or constant then linear to 0",
    )
    p.add_argument("--warmdown-frac", type=float, help="last fraction that warmdown decays (0.3)")
    p.add_argument(
        "--max-time",
        type=float,
        metavar="SECONDS",
        help="stop when this much training time is spent; the lr schedule "
        "follows the larger of the step and time fractions",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "best", "float32", "bfloat16"],
        help="training precision: bfloat16 autocast; auto: bfloat16 on CUDA; "
        "best: also on CPUs with bfloat16 hardware (AVX512-BF16, AMX)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model for training",
    )
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-steps", type=positive_int)
    p.add_argument("--eval-interval", type=positive_int)
    p.add_argument("--eval-tokens", type=positive_int)
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument(
        "--resume", action="store_true", default=None, help="continue the interrupted run in --out"
    )
    p.add_argument(
        "--skip-nonfinite",
        action="store_true",
        default=None,
        help="skip a batch whose loss is NaN or infinite (default: stop the run there)",
    )
    p.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="fine-tune this checkpoint (shipped name or directory): its tokenizer "
        "and architecture, this run's schedule",
    )
    p.add_argument(
        "--unknown",
        choices=["map", "drop"],
        help="characters/words the parent's tokenizer lacks: map to <unk> (default) or drop",
    )
    p.add_argument(
        "--lora-rank",
        type=positive_int,
        help="train a LoRA adapter of this rank (with --init-from; GPT only)",
    )
    p.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default 2 x rank)")
    p.add_argument(
        "--lora-targets",
        metavar="NAMES",
        help="comma-separated GPT linear layers to adapt (default "
        "c_attn,c_proj,c_fc: attention and MLP)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from lm.train import TrainConfig, read_recipe, run_training

    settings = read_recipe(args.config) if args.config else {}
    if args.config:  # recipe paths are relative to the recipe
        base = Path(args.config).parent
        for key in ("corpus", "loss_mask"):
            if settings.get(key):
                values = settings[key] if isinstance(settings[key], list) else [settings[key]]
                settings[key] = [str(_relative_to(base, value)) for value in values]
    if "out" in settings and args.config:
        settings["out"] = str(_relative_to(Path(args.config).parent, settings["out"]))
    if settings.get("init_from") and args.config:  # a run's folder, or a shipped name
        parent = _relative_to(Path(args.config).parent, settings["init_from"])
        if parent.is_dir():
            settings["init_from"] = str(parent)
    skip = {"config", "func", "command", "no_progress"}
    settings.update({k: v for k, v in vars(args).items() if k not in skip and v is not None})
    config = TrainConfig.from_dict(settings)
    summary = run_training(config, progress=not args.no_progress)
    if "val_loss" in summary:
        print(
            f"best validation loss {summary['val_loss']:.4f} "
            f"(perplexity {summary['val_perplexity']:.2f}, {summary['val_bpc']:.3f} bits/char) "
            f"saved in {config.out}"
        )
    return 0


def _relative_to(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path
