"""Generator: streaming equals completing, n samples per prompt, empty prompts, and text
pieces that never split a UTF-8 character."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm.checkpoint import Checkpoint, load_checkpoint
from lm.errors import LMError
from lm.generate import Generator, encode_prompt
from lm.models import ModelConfig
from lm.sampling import SamplingParams
from lm.tokenizers import BPETokenizer, IncrementalDecoder

MULTIBYTE_TEXT = "héllo wörld 日本語 🙂\n" * 40


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus_text, tiny_gpt_saver) -> Checkpoint:
    directory = tmp_path_factory.mktemp("generate") / "tiny"
    return load_checkpoint(tiny_gpt_saver(directory, corpus_text, block_size=32))


@pytest.fixture(scope="module")
def small_bpe() -> BPETokenizer:
    """Few merges: most multi-byte characters stay split over several byte tokens."""
    return BPETokenizer.train(MULTIBYTE_TEXT, vocab_size=262)


def test_stream_joins_to_the_completed_text(checkpoint):
    generator = Generator(checkpoint)
    for params in (
        SamplingParams(max_new_tokens=40, seed=3),
        SamplingParams(max_new_tokens=40, temperature=0.7, top_k=5, seed=4),
        SamplingParams(max_new_tokens=40, temperature=0.0),
    ):
        pieces = list(generator.stream("The king", params))
        [completion] = generator.complete(["The king"], params)
        assert len(pieces) > 1
        assert all(pieces)  # no empty pieces
        assert "".join(pieces) == completion.text
        assert completion.finish_reason == "length"
        assert len(completion.token_ids) == 40
        assert completion.prompt_tokens == len("The king")


def test_stream_and_complete_agree_with_a_stop_sequence(checkpoint):
    generator = Generator(checkpoint)
    full = generator.complete(["We "], SamplingParams(max_new_tokens=40, seed=5))[0].text
    stop = full[10:12]
    params = SamplingParams(max_new_tokens=40, seed=5, stop=[stop])
    [completion] = generator.complete(["We "], params)
    assert completion.finish_reason == "stop"
    assert completion.text == full[: full.find(stop)]
    assert "".join(generator.stream("We ", params)) == completion.text


def test_closing_a_stream_early_frees_the_engine(checkpoint):
    generator = Generator(checkpoint)
    stream = generator.stream("The king", SamplingParams(max_new_tokens=10_000, seed=1))
    first = next(stream)
    assert first
    assert generator.engine.num_running == 1
    stream.close()
    assert not generator.engine.has_work()


def test_complete_n_samples_for_each_prompt(checkpoint):
    generator = Generator(checkpoint)
    prompts = ["The king", "A young poet", ""]
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=10)
    results = generator.complete(prompts, params, n=3)
    assert len(results) == len(prompts) * 3
    assert [r.prompt_index for r in results] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(r.finish_reason == "length" and len(r.token_ids) == 24 for r in results)
    for index in range(len(prompts)):
        texts = [r.text for r in results if r.prompt_index == index]
        assert len(set(texts)) == 3  # each sample index draws with its own seed
    again = generator.complete(prompts, params, n=3)
    assert [r.text for r in again] == [r.text for r in results]
    # Sample i is drawn with seed + i: the same as asking for that seed alone.
    alone = generator.complete(
        ["A young poet"], SamplingParams(max_new_tokens=24, temperature=1.0, seed=12)
    )
    assert alone[0].text == results[5].text


def test_complete_without_a_seed_still_returns_every_sample(checkpoint):
    results = Generator(checkpoint).complete(["We"], SamplingParams(max_new_tokens=8), n=2)
    assert len(results) == 2
    assert all(len(r.token_ids) == 8 for r in results)


def test_n_below_one_is_refused(checkpoint):
    with pytest.raises(LMError, match="n must be at least 1"):
        Generator(checkpoint).complete(["We"], SamplingParams(), n=0)


def test_empty_prompt(checkpoint):
    generator = Generator(checkpoint)
    assert encode_prompt(checkpoint, "") == checkpoint.tokenizer.encode("\n")
    params = SamplingParams(max_new_tokens=15, seed=2)
    pieces = list(generator.stream("", params))
    [completion] = generator.complete([""], params)
    assert "".join(pieces) == completion.text
    assert len(completion.token_ids) == 15
    assert completion.prompt_tokens == 1


def test_a_prompt_of_unknown_characters_still_generates(checkpoint):
    [completion] = Generator(checkpoint).complete(["€€€"], SamplingParams(max_new_tokens=5))
    assert len(completion.token_ids) == 5


# -- UTF-8: never a split character ---------------------------------------------------------


def test_bpe_splits_multibyte_characters_over_tokens(small_bpe):
    """The premise of the tests below: some tokens hold only part of a character."""
    ids = small_bpe.encode(MULTIBYTE_TEXT)
    assert small_bpe.decode(ids) == MULTIBYTE_TEXT
    assert any("\ufffd" in small_bpe.decode([i]) for i in ids)


@pytest.mark.parametrize("vocab_size", [262, 1024])
def test_incremental_decoder_never_splits_a_character(vocab_size):
    tokenizer = BPETokenizer.train(MULTIBYTE_TEXT, vocab_size=vocab_size)
    ids = tokenizer.encode(MULTIBYTE_TEXT)
    assert len(ids) > 64  # long enough for the decoder to trim its window
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == MULTIBYTE_TEXT
    assert not any("\ufffd" in piece for piece in pieces)


def test_incremental_decoder_after_a_prompt(small_bpe):
    prompt = small_bpe.encode("日本語 🙂\nhé")
    rest = small_bpe.encode("llo wörld 日本語 🙂\n" * 3)
    decoder = IncrementalDecoder(small_bpe, prompt)
    pieces = [decoder.push(i) for i in rest]
    assert "".join(pieces) == "llo wörld 日本語 🙂\n" * 3
    assert not any("\ufffd" in piece for piece in pieces)


class ScriptedModel(torch.nn.Module):
    """Says `script`, one token per step, after a one-token prompt: the model interface
    the engine needs (`init_state`, `step`, `context_size`), with known output."""

    context_size = None

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.script = script
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engine finds the device here

    def init_state(self, batch_size: int, device=None) -> dict:
        return {"pos": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def step(self, ids: torch.Tensor, state: dict):
        pos = state["pos"] + ids.shape[1]  # the first generated token comes at pos 1
        index = (pos - 1).clamp(max=len(self.script) - 1)
        logits = torch.full((ids.shape[0], self.vocab_size), -10.0)
        logits[torch.arange(ids.shape[0]), torch.tensor(self.script)[index]] = 10.0
        return logits, {"pos": pos}


def test_streaming_through_the_engine_never_splits_a_character(small_bpe, tmp_path: Path):
    target = "日本語 🙂 héllo wörld\n🙂🙂 日本"
    script = small_bpe.encode(target)
    assert len(script) > len(target)  # characters split over several tokens
    model = ScriptedModel(script, small_bpe.vocab_size)
    checkpoint = Checkpoint(
        model=model,
        tokenizer=small_bpe,
        path=tmp_path,
        config=ModelConfig(vocab_size=small_bpe.vocab_size),
    )
    generator = Generator(checkpoint)
    assert len(encode_prompt(checkpoint, "")) == 1
    params = SamplingParams(max_new_tokens=len(script), temperature=0.0)
    pieces = list(generator.stream("", params))
    assert "".join(pieces) == target
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) > 5
    [completion] = generator.complete([""], params)
    assert completion.text == target
    assert completion.token_ids == script
