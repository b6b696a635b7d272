"""Shared fixtures: one CPU thread, a small synthetic corpus, the reference corpus."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

_SUBJECTS = ["The king", "A young poet", "My good lord", "The old sailor", "Her sister", "We"]
_VERBS = ["speaks of", "remembers", "walks toward", "cannot forget", "sings about", "defends"]
_OBJECTS = [
    "the quiet sea",
    "a broken sword",
    "the northern hills",
    "his father's house",
    "the winter rain",
    "a letter, sealed and lost",
    "the crown",
    "our small garden",
]
_ENDINGS = [".", "!", "?", ";", ", and so it goes.", "."]


def make_corpus(n_sentences: int = 120, seed: int = 0) -> str:
    """English-like text with punctuation and line breaks, the same on every call."""
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_sentences):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        line.append(sentence + rng.choice(_ENDINGS))
        if rng.random() < 0.3:
            lines.append(" ".join(line))
            line = []
            if rng.random() < 0.2:
                lines.append("")
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread, and leave the other core alone."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return make_corpus()


@pytest.fixture
def corpus_path(tmp_path: Path, corpus_text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


@pytest.fixture
def shakespeare_path() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    path = Path(os.environ.get("LM_DATA_DIR", default)) / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"reference corpus not found at {path} (set LM_DATA_DIR)")
    return path
