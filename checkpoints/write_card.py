"""Write a shipped checkpoint's card (README.md) from what its training recorded.

    python checkpoints/write_card.py shakespeare-char-gpt [NAME ...]

The numbers come from config.json (written by `lm train` after it evaluates the best
checkpoint on the whole validation split); the sample is generated with a fixed seed.
tests/test_shipped_checkpoints.py re-evaluates each model and checks the card's loss.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def describe_model(model: dict) -> str:
    if model["kind"] == "gpt":
        blocks = "classic GPT-2 blocks"
        if model.get("position") == "rope":
            parts = [
                "rotary positions",
                model.get("norm", "layernorm").replace("rmsnorm", "RMSNorm"),
                "QK-norm" if model.get("qk_norm") else "",
                {"swiglu": "SwiGLU", "relu2": "ReLU-squared", "gelu": "GELU"}[
                    model.get("mlp", "gelu")
                ],
                "tied output" if model.get("tie_embeddings", True) else "untied output",
            ]
            blocks = ", ".join(p for p in parts if p)
        return (
            f"GPT: {model['n_layer']} layers, {model['n_head']} heads, {model['n_embd']} wide, "
            f"context {model['block_size']} tokens, dropout {model['dropout']} ({blocks})"
        )
    return (
        f"{model['kind'].upper()}: {model['n_layer']} layers of {model['n_embd']} units, "
        f"trained on {model['block_size']}-token BPTT windows, dropout {model['dropout']}"
    )


def fewshot_section(name: str) -> list[str]:
    """Accuracy from bench/results/fewshot.json (written by `python -m bench.fewshot_bench`)."""
    path = HERE.parent / "bench" / "results" / "fewshot.json"
    if not name.startswith("fewshot") or not path.is_file():
        return []
    result = json.loads(path.read_text())
    mine = result["results"].get(name)
    if mine is None or "words" not in next(iter(mine.values())):
        return []  # none, or from before the categories: run the bench again
    shots = list(mine)
    last = mine[shots[-1]]
    categories = result.get("categories") or {c: c for c in ("words", "random", "long", "unseen")}
    lines = [
        "## Few-shot accuracy",
        "",
        f"Exact match of greedy completions on held-out episodes (`{result['command']}`):",
        "",
        "| shots | " + " | ".join(shots) + " |",
        "|---|" + "---|" * len(shots),
    ]
    for key, label in (*categories.items(), ("overall", "all")):
        lines.append(
            f"| {label} | " + " | ".join(f"{100 * mine[s][key]:.1f}%" for s in shots) + " |"
        )
    lines.append("")
    for key in categories:
        lines.append(
            f"Per task at {shots[-1]} shots, {key}: "
            + ", ".join(
                f"{task} {100 * value:.0f}%" for task, value in last["per_task"][key].items()
            )
            + "."
        )
        lines.append("")
    templates = result.get("templates", {}).get(name)
    if templates:
        from lm.tasks import HELDOUT_TEMPLATES

        lines += [
            f"Other prompt formats at {shots[-1]} shots (`--template`; the default first):",
            "",
            "| template | " + " | ".join(categories) + " |",
            "|---|" + "---|" * len(categories),
        ]
        for template, scores in templates.items():
            kind = "never trained on" if template in HELDOUT_TEMPLATES else "in the corpus"
            cells = " | ".join(f"{100 * scores[key]:.1f}%" for key in categories)
            lines.append(f"| `{template!r}` ({kind}) | {cells} |")
        lines.append("")
    return lines


def write_card(name: str, description: str = "") -> Path:
    from lm.checkpoint import load_checkpoint
    from lm.generate import Generator
    from lm.sampling import SamplingParams

    directory = HERE / name
    meta = json.loads((directory / "config.json").read_text())
    training = meta["training"]
    settings = training.get("settings", {})
    tokens_per_step = settings.get("batch_size", 0) * settings.get("block_size", 0)
    # A run on a time budget stops where the clock says; max_steps is then only a cap.
    steps = training.get("step", 0) if training.get("max_time") else training.get("max_steps", 0)
    optimizer = settings.get("optimizer", "adamw")
    optimizer = "Muon + AdamW" if optimizer == "muon" else "AdamW"
    prompt = {"fewshot": "apple => elppa\nriver => revir\nstone => enots\ngarden => "}.get(
        name.split("-")[0], "ROMEO:\n"
    )
    # Trained with the loss on the answers only (lm train --loss-mask), a model writes
    # answers, not new examples: its sample stops at the answer's line end.
    answers_only = bool(settings.get("loss_mask"))
    checkpoint = load_checkpoint(directory)
    params = SamplingParams(
        max_new_tokens=300, temperature=0.8, top_k=0, seed=0, stop=["\n"] if answers_only else []
    )
    sample = Generator(checkpoint).complete([prompt], params)[0].text
    minutes = training.get("train_seconds", 0) / 60
    corpus = ", ".join(Path(c).name for c in training.get("corpus", []))
    # A versioned recipe (recipe-v3.toml), while there is one beside recipe.toml, made the
    # weights trained on that version's corpus (fewshot-tasks-v3.txt); recipe.toml the others.
    version = re.search(r"-(v\d+)\.txt", corpus)
    recipe = f"recipe-{version[1]}.toml" if version else "recipe.toml"
    if not (directory / recipe).is_file():
        recipe = "recipe.toml"
    lines = [
        f"# {name}",
        "",
        description
        or f"A {meta['tokenizer']['kind']}-level {meta['model']['kind'].upper()} "
        f"trained on {corpus}.",
        "",
        "| | |",
        "|---|---|",
        f"| corpus | `{corpus}` ({training.get('corpus_hash', '?')}), last "
        f"{training.get('val_fraction', 0.1):.0%} held out for validation |",
        f"| tokenizer | {meta['tokenizer']['kind']}, {meta['tokenizer']['vocab_size']:,} tokens |",
        f"| model | {describe_model(meta['model'])} |",
        f"| parameters | {meta['num_params']:,} |",
        f"| training | {steps:,} steps of {settings.get('batch_size')} x "
        f"{settings.get('block_size')} tokens ({tokens_per_step * steps:,} "
        f"tokens), {optimizer}; best checkpoint at step {training.get('step')} |",
        f"| hardware | {minutes:.1f} minutes on {training.get('threads')} CPU threads "
        f"({cpu_name()}), device {training.get('device')} |",
        f"| validation loss | {training['val_loss']:.4f} |",
        f"| perplexity | {training['val_perplexity']:.3f} per token |",
        f"| bits per character | {training['val_bpc']:.4f} |",
        f"| validation tokens | {training['val_tokens']:,} "
        f"({'the answers of ' if answers_only else ''}"
        f"{'the whole held-out split' if training.get('val_full_split') else 'a subset'}) |",
        "",
        f"Reproduce: `lm train --config checkpoints/{name}/{recipe}` (see `{recipe}`).",
        f"Check: `lm eval --checkpoint {name} --corpus data/{corpus}`."
        if name.startswith("shakespeare")
        else "",
        "",
        f"Sample (`temperature 0.8, seed 0`, prompt {prompt!r}"
        + (
            ", stopped at the answer's line end: trained on answers only):"
            if answers_only
            else "):"
        ),
        "",
        "```",
        prompt + sample,
        "```",
        "",
        "![loss curve](loss.png)",
        "",
    ]
    lines += fewshot_section(name)
    extra = directory / "EXTRA.md"
    if extra.is_file():
        lines += [extra.read_text().rstrip(), ""]
    card = directory / "README.md"
    card.write_text("\n".join(lines))
    return card


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(write_card(arg))
