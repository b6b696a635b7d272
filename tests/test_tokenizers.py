"""Tokenizers: save/load fidelity, unknowns, spacing, round trips, incremental decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm.checkpoint import read_config, shipped_checkpoints, shipped_dir
from lm.errors import LMError
from lm.tasks import make_corpus as make_tasks_corpus
from lm.tokenizers import (
    KINDS,
    TOKENIZERS,
    UNK,
    BPETokenizer,
    CharTokenizer,
    IncrementalDecoder,
    WordTokenizer,
    load_tokenizer,
    tokenizer_class,
    train_tokenizer,
)

SAMPLE = "My good lord remembers the crown.\nThe king, tired; walks toward the sea!\n"


@pytest.fixture(scope="module")
def bpe(corpus_text) -> BPETokenizer:
    return BPETokenizer.train(corpus_text, vocab_size=300)


@pytest.mark.parametrize("kind", KINDS)
def test_saved_tokenizer_encodes_identically(kind, corpus_text, tmp_path):
    tokenizer = train_tokenizer(kind, corpus_text, vocab_size=400 if kind != "char" else None)
    tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path, kind)
    assert loaded.kind == kind
    assert loaded.vocab_size == tokenizer.vocab_size
    for text in (SAMPLE, corpus_text[:500]):
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == tokenizer.decode(tokenizer.encode(text))


def test_load_refuses_a_tokenizer_of_another_kind(corpus_text, tmp_path):
    CharTokenizer.train(corpus_text).save(tmp_path)
    with pytest.raises(LMError, match="char"):
        load_tokenizer(tmp_path, "word")


def test_load_names_a_missing_tokenizer_file(tmp_path):
    with pytest.raises(LMError, match="tokenizer.json"):
        load_tokenizer(tmp_path, "char")


def test_unknown_tokenizer_kind_is_an_lm_error(corpus_text):
    with pytest.raises(LMError, match="unknown tokenizer"):
        train_tokenizer("morse", corpus_text)


def test_registry_maps_each_kind_to_its_class(corpus_text, tmp_path):
    assert KINDS == tuple(TOKENIZERS) == ("char", "word", "bpe", "spm")
    for kind, cls in TOKENIZERS.items():
        assert cls.kind == kind and tokenizer_class(kind) is cls
    char = TOKENIZERS["char"].train(corpus_text)
    char.save(tmp_path)
    assert TOKENIZERS["char"].load(tmp_path).encode(SAMPLE) == char.encode(SAMPLE)


@pytest.mark.parametrize("kind", ["morse", "", None, "CHAR"])
def test_unknown_kind_is_an_error_naming_the_choices(kind, corpus_text, tmp_path):
    CharTokenizer.train(corpus_text).save(tmp_path)  # a loadable file is no excuse to guess
    for call in (
        lambda: tokenizer_class(kind),
        lambda: load_tokenizer(tmp_path, kind),
        lambda: train_tokenizer(kind, corpus_text),
    ):
        with pytest.raises(
            LMError, match=f"unknown tokenizer {kind!r}; choose one of char, word, bpe, spm"
        ):
            call()


VOCAB_CHECKPOINTS = [
    n
    for n in shipped_checkpoints()
    if read_config(shipped_dir() / n)["tokenizer"]["kind"] in ("char", "word")
]
LEGACY = Path(__file__).parent / "data" / "legacy_tokenizers"  # the files before issue 15
# The checkpoints shipped then and not retrained since (a retrained one has its own vocabulary).
LEGACY_CHECKPOINTS = [n for n in VOCAB_CHECKPOINTS if (LEGACY / f"{n}.json").is_file()]


@pytest.mark.parametrize("name", VOCAB_CHECKPOINTS)
def test_shipped_vocabulary_saves_back_byte_identical(name, tmp_path):
    directory = shipped_dir() / name
    kind = read_config(directory)["tokenizer"]["kind"]
    tokenizer = load_tokenizer(directory, kind)
    tokenizer.save(tmp_path)
    saved = (tmp_path / "tokenizer.json").read_bytes()
    assert saved == (directory / "tokenizer.json").read_bytes()
    assert tokenizer.decode(tokenizer.encode(SAMPLE)) == load_tokenizer(tmp_path, kind).decode(
        load_tokenizer(tmp_path, kind).encode(SAMPLE)
    )


@pytest.mark.parametrize("name", LEGACY_CHECKPOINTS)
def test_shipped_vocabulary_rewritten_as_hf_encodes_as_before(name, shakespeare_path, tmp_path):
    """The shipped tokenizer.json (now a `tokenizers` file) has the ids of the old own-format
    file, which still loads."""
    directory = shipped_dir() / name
    kind = read_config(directory)["tokenizer"]["kind"]
    assert "kind" not in json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer.json").write_bytes((LEGACY / f"{name}.json").read_bytes())
    before, now = load_tokenizer(tmp_path, kind), load_tokenizer(directory, kind)
    assert now.itos == before.itos
    text = shakespeare_path.read_text(encoding="utf-8")[:200_000] + make_tasks_corpus(
        300, version=2
    )
    assert now.encode(text) == before.encode(text)
    assert now.decode(now.encode(text)) == before.decode(before.encode(text))


@pytest.fixture(scope="module")
def shipped_corpora(corpus_text) -> dict[str, str]:
    """Every corpus a shipped char/word checkpoint was trained on (few-shot: a sample), by name."""
    shakespeare = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
    return {
        "tinyshakespeare": shakespeare.read_text(encoding="utf-8"),
        "fewshot-tasks": make_tasks_corpus(2000, seed=1234, version=2),
        "fewshot-tasks-v3": make_tasks_corpus(2000, seed=1234, version=3),
        "synthetic": corpus_text,
    }


@pytest.mark.parametrize("kind", ["char", "word"])
@pytest.mark.parametrize(
    "corpus", ["tinyshakespeare", "fewshot-tasks", "fewshot-tasks-v3", "synthetic"]
)
def test_vocabulary_file_is_a_hf_tokenizer_that_encodes_as_ours(
    kind, corpus, shipped_corpora, tmp_path
):
    from tokenizers import Tokenizer as HFTokenizer

    text = shipped_corpora[corpus]
    tokenizer = train_tokenizer(kind, text[: len(text) // 2], vocab_size=3000)  # some <unk>
    tokenizer.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = tokenizer.encode(text)
    assert hf.encode(text, add_special_tokens=False).ids == ids
    assert hf.get_vocab_size() == tokenizer.vocab_size
    assert hf.decode(ids) == tokenizer.decode(ids)
    assert hf.decode(ids[:500]) == tokenizer.decode(ids[:500])


@pytest.mark.parametrize("name", VOCAB_CHECKPOINTS)
def test_shipped_vocabulary_loads_in_hf_tokenizers(name, shakespeare_path):
    from tokenizers import Tokenizer as HFTokenizer

    directory = shipped_dir() / name
    tokenizer = load_tokenizer(directory, read_config(directory)["tokenizer"]["kind"])
    hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    text = shakespeare_path.read_text(encoding="utf-8") + make_tasks_corpus(300, version=2)
    assert hf.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)


def test_bpe_refuses_a_vocabulary_file(corpus_text, tmp_path):
    WordTokenizer.train(corpus_text).save(tmp_path)
    with pytest.raises(LMError, match="holds a 'word' tokenizer, config says 'bpe'"):
        load_tokenizer(tmp_path, "bpe")


# -- char ---------------------------------------------------------------------------------


def test_char_round_trip_and_unknown_character(corpus_text):
    tokenizer = CharTokenizer.train(corpus_text)
    assert tokenizer.vocab_size == len(set(corpus_text)) + 1
    assert tokenizer.decode(tokenizer.encode(SAMPLE)) == SAMPLE
    ids = tokenizer.encode("king§")
    assert ids[-1] == 0 and tokenizer.id_to_token(0) == UNK
    assert all(i > 0 for i in ids[:-1])
    assert tokenizer.decode(ids) == "king"  # <unk> decodes to nothing


def test_char_vocabulary_of_tiny_shakespeare(shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    assert CharTokenizer.train(text).vocab_size == 65 + 1  # nanoGPT's 65 characters + <unk>


# -- word ---------------------------------------------------------------------------------


def test_word_vocabulary_cap_keeps_the_most_frequent(corpus_text):
    tokenizer = WordTokenizer.train(corpus_text, vocab_size=20)
    assert tokenizer.vocab_size == 20
    assert tokenizer.token_to_id("the") is not None  # the most frequent word survives
    uncapped = WordTokenizer.train(corpus_text, vocab_size=10_000)
    assert 20 < uncapped.vocab_size < 10_000


def test_word_unknown_words_map_to_unk(corpus_text):
    tokenizer = WordTokenizer.train(corpus_text)
    ids = tokenizer.encode("The king eats zebras.")
    assert [tokenizer.id_to_token(i) for i in ids] == ["The", "king", UNK, UNK, "."]


def test_word_decode_spaces_like_prose():
    tokenizer = WordTokenizer.train("Hello, world! (It is) my father's house; yes.\nNext line?")
    for text in ("Hello, world!", "my father's house; yes.", "(It is) Hello?\nNext line!"):
        assert tokenizer.decode(tokenizer.encode(text)) == text


# -- bpe ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text())
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_round_trips_non_ascii(bpe):
    text = "héllo 日本語 🙂\n\tçà et là — «ok»\x00"
    assert bpe.decode(bpe.encode(text)) == text


# -- spm ----------------------------------------------------------------------------------


def test_spm_round_trips_text_with_newlines(corpus_text):
    tokenizer = train_tokenizer("spm", corpus_text, vocab_size=400)
    for text in (SAMPLE, "First line.\n\nThird line,  two spaces.\n", corpus_text[:400]):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.token_to_id("\n") is not None  # newline is a token of its own


# -- incremental decoding -----------------------------------------------------------------


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tokenizer)
    return [decoder.push(i) for i in ids]


@pytest.mark.parametrize(
    "text",
    ["héllo 日本語 🙂", "🙂🙂🙂 ok", "The king speaks.\n" * 30 + "é"],
    ids=["mixed", "emoji", "long"],
)
def test_incremental_decoder_bpe_never_splits_a_character(bpe, text):
    ids = bpe.encode(text)
    pieces = _pieces(bpe, ids)
    assert "".join(pieces) == bpe.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert any("\ufffd" in bpe.decode([i]) for i in ids)  # some character spans tokens


@pytest.mark.parametrize("kind", ["char", "word", "spm"])
def test_incremental_decoder_other_kinds(kind, corpus_text):
    tokenizer = train_tokenizer(kind, corpus_text, vocab_size=400 if kind != "char" else None)
    ids = tokenizer.encode(SAMPLE)
    assert "".join(_pieces(tokenizer, ids)) == tokenizer.decode(ids)


def test_char_pieces_are_what_the_windowed_decoder_gives(corpus_text):
    """A character tokenizer's decoder looks each id up; the pieces are those of decoding
    a window per token, unknown characters (id 0) included."""
    tokenizer = train_tokenizer("char", corpus_text)
    ids = tokenizer.encode(SAMPLE + "\u2603 ok") + [0, tokenizer.vocab_size + 5]
    windowed = IncrementalDecoder(tokenizer)
    windowed.pieces = None
    assert _pieces(tokenizer, ids) == [windowed.push(i) for i in ids]
    assert "".join(_pieces(tokenizer, ids)) == tokenizer.decode(ids)


def test_spm_vocabulary_too_small_is_an_lm_error(corpus_text):
    with pytest.raises(LMError, match="--vocab-size 100"):
        train_tokenizer("spm", corpus_text, vocab_size=100)
