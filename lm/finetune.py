"""Fine-tuning's parts of training: the parent checkpoint, and a corpus's unknown tokens.

`lm train --init-from CHECKPOINT` keeps the parent's tokenizer and architecture. Char and
word tokenizers have always had `<unk>` at id 0 (what `encode` gives an unseen character
or word), so old checkpoints load and encode as before; a corpus's unknown characters or
words are counted, reported, and either mapped to that id or dropped. Byte-level BPE and
SentencePiece (with byte fallback) have no unknown text.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from lm.errors import LMError
from lm.tokenizers import Tokenizer, VocabTokenizer

logger = logging.getLogger(__name__)
UNKNOWN_MODES = ("map", "drop")
UNK_ID = 0  # VocabTokenizer's <unk>


def unknown_tokens(tokenizer: Tokenizer, text: str) -> Counter:
    """How often each character or word of `text` is missing from the vocabulary."""
    if not isinstance(tokenizer, VocabTokenizer):
        return Counter()
    stoi = tokenizer.stoi
    return Counter(token for token in tokenizer.split(text) if token not in stoi)


def describe_unknowns(counts: Counter, total: int, mode: str, unit: str) -> str:
    """One line for the user: how many, which, and what happens to them."""
    examples = ", ".join(repr(token) for token, _ in counts.most_common(8))
    action = "mapped to <unk>" if mode == "map" else "dropped"
    return (
        f"{sum(counts.values()):,} of {total:,} {unit}s ({len(counts)} distinct) are not in "
        f"the parent's vocabulary, e.g. {examples}: {action} (--unknown map|drop)"
    )


def encode_corpus(tokenizer: Tokenizer, text: str, mode: str) -> tuple[list[int], Counter]:
    """Token ids of `text` with unknown tokens mapped to <unk> or dropped, and their counts."""
    if mode not in UNKNOWN_MODES:
        raise LMError(f"--unknown must be one of {', '.join(UNKNOWN_MODES)}, got {mode!r}")
    counts = unknown_tokens(tokenizer, text)
    ids = tokenizer.encode(text)
    if counts and mode == "drop":
        ids = [i for i in ids if i != UNK_ID]
    return ids, counts


@torch.no_grad()
def init_unknown_row(model: torch.nn.Module) -> None:
    """Start `<unk>`'s embedding (and output row) at the mean of the known tokens' rows.

    A parent that never saw `<unk>` has only pushed its output logit down; the mean row
    starts it as an average token instead of an impossible one.
    """
    rows = [model.wte.weight]
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight is not model.wte.weight:
        rows.append(head.weight)
    for weight in rows:
        weight[UNK_ID] = weight[UNK_ID + 1 :].mean(dim=0)
    if head is not None and head.bias is not None:
        head.bias[UNK_ID] = head.bias[UNK_ID + 1 :].mean()


def report(message: str) -> None:
    """Tell the user (stderr, through logging's last resort when nothing is configured)."""
    logger.warning(message)
