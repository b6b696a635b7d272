"""Build the word lists of `lm make-tasks` ONCE, from text on this machine; the lists are
committed (lm/wordlists/train.txt, heldout.txt), so nothing here runs at training time.

    apt-get install wamerican   # Debian's /usr/share/dict/words
    python lm/wordlists/build.py [--shakespeare ../shared/data/tinyshakespeare.txt]

Sources: Debian's wamerican list (lowercase entries only: no proper nouns, no apostrophes),
the words of the reference corpus (tinyshakespeare), and words that recur in the docstrings
and comments of Python packages in this environment (torch, numpy, fastapi, pydantic, ...).
`lm.tasks.is_heldout` (a hash of the word) splits them: held-out words never reach training.
Training keeps lengths 1 to 12; the held-out list keeps 3 to 16 (13+ are "longer than
training").
"""

from __future__ import annotations

import argparse
import re
import sys
import sysconfig
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from lm.tasks import MAX_TRAIN_LENGTH, MAX_WORD_LENGTH, is_heldout  # noqa: E402

PACKAGES = ("torch", "numpy", "fastapi", "pydantic", "starlette", "setuptools", "pip")
WORD = re.compile(r"[A-Za-z]+")


def dictionary_words(path: Path) -> set[str]:
    return {w for w in path.read_text(encoding="utf-8").split() if re.fullmatch("[a-z]+", w)}


def corpus_words(path: Path, min_count: int = 2) -> set[str]:
    counts = Counter(w.lower() for w in WORD.findall(path.read_text(encoding="utf-8")))
    return {w for w, n in counts.items() if n >= min_count}


def docstring_words(min_count: int = 20) -> set[str]:
    """Lowercase words that recur in the comments and docstrings of installed packages."""
    site = Path(sysconfig.get_paths()["purelib"])
    counts: Counter[str] = Counter()
    for package in PACKAGES:
        for file in sorted((site / package).rglob("*.py"))[:400]:
            text = file.read_text(encoding="utf-8", errors="ignore")
            prose = re.findall(r'"""(.*?)"""|#([^\n]*)', text, flags=re.S)
            for doc, comment in prose:
                counts.update(w for w in WORD.findall(doc + " " + comment) if w.islower())
    return {w for w, n in counts.items() if n >= min_count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dictionary", default="/usr/share/dict/american-english")
    parser.add_argument(
        "--shakespeare", default=str(HERE.parents[2] / "shared/data/tinyshakespeare.txt")
    )
    args = parser.parse_args()
    words = dictionary_words(Path(args.dictionary))
    words |= corpus_words(Path(args.shakespeare))
    words |= docstring_words()
    words = {w for w in words if len(w) <= MAX_WORD_LENGTH}
    train = sorted(w for w in words if not is_heldout(w) and len(w) <= MAX_TRAIN_LENGTH)
    heldout = sorted(w for w in words if is_heldout(w))
    for name, items in (("train", train), ("heldout", heldout)):
        (HERE / f"{name}.txt").write_text("\n".join(items) + "\n", encoding="utf-8")
        print(f"{name}.txt: {len(items):,} words")


if __name__ == "__main__":
    main()
