"""Tokenizers: text <-> token ids. Character, word, byte-level BPE and SentencePiece.

Each tokenizer is trained on the user's corpus, saved into the checkpoint directory and
reloaded to behave identically. All share one small interface (`Tokenizer`).
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from lm.errors import LMError

TOKENIZER_FILE = "tokenizer.json"
SPM_FILE = "tokenizer.model"
UNK = "<unk>"


class Tokenizer(Protocol):
    """What every tokenizer kind offers; `TOKENIZERS` maps each kind to its class."""

    kind: str

    @classmethod
    def train(cls, text: str, vocab_size: int | None = None) -> Tokenizer: ...

    @classmethod
    def load(cls, directory: Path) -> Tokenizer: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def id_to_token(self, token_id: int) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def save(self, directory: Path) -> None: ...


class VocabTokenizer:
    """A fixed list of string tokens, id 0 for `<unk>`, saved as a Hugging Face tokenizer.json.

    Owns the vocabulary plumbing (id <-> token maps, save, load); a variant says only how
    text splits into tokens (`split`), how tokens join back (`decode`), how it trains, and
    the `tokenizers` pre-tokenizer and decoder that split and join the same way, so the
    saved file is a WordLevel tokenizer that `tokenizers.Tokenizer.from_file` loads.
    """

    kind: str

    def __init__(self, tokens: list[str]):
        self.itos = [UNK, *tokens]
        self.stoi = {token: i for i, token in enumerate(self.itos)}

    @classmethod
    def load(cls, directory: Path) -> VocabTokenizer:
        path = directory / TOKENIZER_FILE
        data = json.loads(path.read_text(encoding="utf-8"))
        if "kind" in data:  # the project's own JSON, written before issue 15
            return cls(list(_read_json(directory, cls.kind)["vocab"]))
        kind = _hf_kind(data)
        if kind != cls.kind:
            raise LMError(f"{path}: holds a {kind!r} tokenizer, config says {cls.kind!r}")
        vocab = data["model"]["vocab"]
        itos = sorted(vocab, key=vocab.__getitem__)
        if [vocab[token] for token in itos] != list(range(len(itos))) or itos[:1] != [UNK]:
            raise LMError(f"{path}: vocabulary ids are not 0..{len(itos) - 1} with {UNK} at 0")
        return cls(itos[1:])

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def split(self, text: str) -> Iterable[str]:
        """The tokens of `text`, before they become ids."""
        raise NotImplementedError

    @staticmethod
    def hf_pipeline() -> tuple:
        """The `tokenizers` (pre_tokenizer, decoder) that split and join as `split`/`decode`."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        get = self.stoi.get
        return [get(token, 0) for token in self.split(text)]

    def id_to_token(self, token_id: int) -> str:
        return self.itos[token_id]

    def token_to_id(self, token: str) -> int | None:
        return self.stoi.get(token)

    def to_hf(self):
        """This tokenizer as a Hugging Face `tokenizers.Tokenizer` (WordLevel) with the same ids."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models

        hf = HFTokenizer(models.WordLevel(self.stoi, unk_token=UNK))
        hf.pre_tokenizer, hf.decoder = self.hf_pipeline()
        return hf

    def save(self, directory: Path) -> None:
        self.to_hf().save(str(directory / TOKENIZER_FILE))


class CharTokenizer(VocabTokenizer):
    """One token per character of the training corpus; unseen characters map to `<unk>`."""

    kind = "char"

    @classmethod
    def train(cls, text: str, vocab_size: int | None = None) -> CharTokenizer:
        """Every character of `text` (a char vocabulary has no size to choose)."""
        return cls(sorted(set(text)))

    def split(self, text: str) -> str:
        return text  # a string iterates over its characters

    @staticmethod
    def hf_pipeline() -> tuple:
        from tokenizers import Regex, decoders, pre_tokenizers

        every_character = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        # <unk> decodes to nothing, as in `decode`; no other token holds "<unk>"
        return every_character, decoders.Sequence([decoders.Replace(UNK, ""), decoders.Fuse()])

    def decode(self, ids: Iterable[int]) -> str:
        itos = self.itos
        return "".join(itos[i] if 0 < i < len(itos) else "" for i in ids)

    @functools.cached_property
    def pieces(self) -> list[str]:
        """Each id's text, whatever comes before it (<unk> decodes to nothing): what
        `IncrementalDecoder` looks up instead of decoding a window per token."""
        return ["", *self.itos[1:]]


# Words (with inner apostrophes), single punctuation marks, and newlines are tokens.
_WORD_RE = re.compile(r"\n|[^\W_]+(?:'[^\W_]+)*|[^\w\s]|_")
_NO_SPACE_BEFORE = set(".,;:!?)]}'\"")
_NO_SPACE_AFTER = set("([{")


class WordTokenizer(VocabTokenizer):
    """Words and punctuation as tokens, capped vocabulary, `<unk>` for the rest."""

    kind = "word"

    @classmethod
    def train(cls, text: str, vocab_size: int | None = None) -> WordTokenizer:
        vocab_size = vocab_size or 8000
        counts = Counter(_WORD_RE.findall(text))
        words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        return cls(words[: max(vocab_size - 1, 1)])

    def split(self, text: str) -> list[str]:
        return _WORD_RE.findall(text)

    @staticmethod
    def hf_pipeline() -> tuple:
        from tokenizers import Regex, decoders, pre_tokenizers

        # invert + removed: keep exactly the regex's matches, as `findall` does
        words = pre_tokenizers.Split(Regex(_WORD_RE.pattern), behavior="removed", invert=True)
        # Join with spaces (WordPiece puts one before every token but the first: no token
        # starts with "##"), then drop the spaces `decode` does not put: around newlines,
        # before closing and after opening marks. Tokens hold no spaces, so every space
        # there is a join.
        joins = [
            decoders.WordPiece(prefix="##", cleanup=False),
            decoders.Fuse(),
            decoders.Replace(" \n", "\n"),
            decoders.Replace("\n ", "\n"),
        ]
        joins += [decoders.Replace(" " + mark, mark) for mark in sorted(_NO_SPACE_BEFORE)]
        joins += [decoders.Replace(mark + " ", mark) for mark in sorted(_NO_SPACE_AFTER)]
        return words, decoders.Sequence(joins)

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        prev = "\n"
        for i in ids:
            word = self.itos[i] if 0 <= i < len(self.itos) else UNK
            if not (
                prev == "\n" or word == "\n" or word in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER
            ):
                out.append(" ")
            out.append(word)
            prev = word
        return "".join(out)


class BPETokenizer:
    """Byte-level BPE from Hugging Face `tokenizers`: any UTF-8 string round-trips exactly."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int | None = None) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size or 1024,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        hf.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, directory: Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = directory / TOKENIZER_FILE
        kind = _hf_kind(json.loads(path.read_text(encoding="utf-8")))
        if kind != cls.kind:
            raise LMError(f"{path}: holds a {kind!r} tokenizer, config says {cls.kind!r}")
        return cls(HFTokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        return self.decode([token_id])

    def token_to_id(self, token: str) -> int | None:
        ids = self.encode(token)
        return ids[0] if len(ids) == 1 else None

    def save(self, directory: Path) -> None:
        self.hf.save(str(directory / TOKENIZER_FILE))


class SentencePieceTokenizer:
    """SentencePiece (unigram by default), trained with `sentencepiece`."""

    kind = "spm"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(
        cls, text: str, vocab_size: int | None = None, model_type: str = "unigram"
    ) -> SentencePieceTokenizer:
        import io

        import sentencepiece as spm

        vocab_size = vocab_size or 1024
        buffer = io.BytesIO()
        lines = [line for line in text.split("\n") if line.strip()]
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=buffer,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=1.0,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                split_digits=True,
                user_defined_symbols=["\n"],
                add_dummy_prefix=False,
                hard_vocab_limit=False,
                minloglevel=2,
            )
        except RuntimeError as exc:  # e.g. fewer tokens than 256 bytes + the corpus's characters
            reason = str(exc).split("] ")[-1].split(". Increase")[0]
            raise LMError(
                f"sentencepiece cannot train with --vocab-size {vocab_size}: {reason}"
            ) from exc
        return cls(buffer.getvalue())

    @classmethod
    def load(cls, directory: Path) -> SentencePieceTokenizer:
        return cls((directory / _read_json(directory, cls.kind)["model_file"]).read_bytes())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        return None if self.sp.is_unknown(token_id) else token_id

    def save(self, directory: Path) -> None:
        (directory / SPM_FILE).write_bytes(self.proto)
        _write_json(directory / TOKENIZER_FILE, {"kind": self.kind, "model_file": SPM_FILE})


TOKENIZERS: dict[str, type[Tokenizer]] = {
    cls.kind: cls for cls in (CharTokenizer, WordTokenizer, BPETokenizer, SentencePieceTokenizer)
}
KINDS = tuple(TOKENIZERS)


def tokenizer_class(kind: str) -> type[Tokenizer]:
    """The tokenizer class registered as `kind`; an unknown kind is an LMError."""
    try:
        return TOKENIZERS[kind]
    except (KeyError, TypeError):
        raise LMError(f"unknown tokenizer {kind!r}; choose one of {', '.join(KINDS)}") from None


def train_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """Train a tokenizer of `kind` on `text` (each kind has its own default vocabulary size)."""
    return tokenizer_class(kind).train(text, vocab_size)


def load_tokenizer(directory: Path, kind: str) -> Tokenizer:
    """Load the tokenizer saved in a checkpoint directory."""
    path = directory / TOKENIZER_FILE
    try:
        cls = tokenizer_class(kind)
    except LMError as exc:
        raise LMError(f"{directory}: {exc}") from None
    if not path.is_file():
        raise LMError(f"{path}: missing tokenizer file")
    try:
        return cls.load(directory)
    except LMError:
        raise
    except Exception as exc:  # damaged file: name it
        raise LMError(f"{path}: cannot load tokenizer ({exc})") from exc


class IncrementalDecoder:
    """Turns a growing list of ids into text pieces without splitting a UTF-8 character.

    Decodes only a short window around the newest tokens (the approach vLLM uses), so
    each step costs O(1) however long the sequence is.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context_ids or [])[-4:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        # A tokenizer whose tokens' text does not depend on their neighbours (characters).
        self.pieces: list[str] | None = getattr(tokenizer, "pieces", None)

    def push(self, token_id: int) -> str:
        if self.pieces is not None:
            return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else ""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            if self.prefix_offset > 64:  # keep the window short
                drop = self.prefix_offset
                self.ids = self.ids[drop:]
                self.prefix_offset -= drop
                self.read_offset -= drop
            return piece
        return ""


def _chunks(text: str, size: int = 1 << 16) -> Iterable[str]:
    for start in range(0, len(text), size):
        yield text[start : start + size]


def _read_json(directory: Path, kind: str) -> dict:
    """The project's own tokenizer.json, checked to hold a tokenizer of `kind`."""
    path = directory / TOKENIZER_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("kind") != kind:
        raise LMError(f"{path}: holds a {data.get('kind')!r} tokenizer, config says {kind!r}")
    return data


def _hf_kind(data: dict) -> str:
    """Which tokenizer kind a Hugging Face tokenizer.json holds ("char", "word", "bpe", ...)."""
    model = data.get("model") or {}
    if model.get("type") == "WordLevel":
        for cls in (CharTokenizer, WordTokenizer):
            if data.get("pre_tokenizer") == json.loads(cls([]).to_hf().to_str())["pre_tokenizer"]:
                return cls.kind
    return str(model.get("type", "unknown")).lower()


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
