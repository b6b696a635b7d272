"""Embeddings: nearest tokens by input embedding, mean hidden states, and `lm neighbors`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lm.checkpoint import load_checkpoint, save_checkpoint
from lm.cli import main
from lm.embeddings import mean_hidden_embedding, nearest_tokens
from lm.errors import LMError
from lm.models import ModelConfig, build_model
from lm.tokenizers import CharTokenizer

TEXT = "hello world\nabc => cba\nthe quick brown fox jumps over the lazy dog\n"
BLOCK = 16


def tiny_model(kind: str, vocab_size: int = 30) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        ModelConfig(
            kind=kind, vocab_size=vocab_size, n_layer=2, n_embd=16, n_head=2, block_size=BLOCK
        )
    )


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    tokenizer = CharTokenizer.train(TEXT)
    save_checkpoint(tmp_path / "ckpt", tiny_model("gpt", tokenizer.vocab_size), tokenizer)
    return tmp_path / "ckpt"


@pytest.mark.parametrize("kind", ["gpt", "lstm", "gru"])
def test_mean_hidden_embedding_shape_determinism_and_padding(kind):
    model = tiny_model(kind)
    batch = [[1, 2, 3, 4, 5], [6, 7], [8]]
    vectors = mean_hidden_embedding(model, batch)
    assert vectors.shape == (3, 16)
    assert torch.isfinite(vectors).all()
    assert_close(vectors, mean_hidden_embedding(model, batch))
    for row, ids in enumerate(batch):  # right-padding in the batch changes nothing
        assert_close(vectors[row], mean_hidden_embedding(model, [ids])[0], atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = model.eval().hidden(torch.tensor([batch[0]])).mean(dim=1)[0]
    assert_close(vectors[0], expected, atol=1e-5, rtol=0)


def test_mean_hidden_embedding_keeps_training_mode_and_takes_tensors():
    model = tiny_model("gpt").train()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    vectors = mean_hidden_embedding(model, ids)
    assert model.training
    assert vectors.shape == (2, 16)


def test_gpt_embeds_the_last_block_of_a_long_input():
    model = tiny_model("gpt")
    long = [i % 29 + 1 for i in range(BLOCK * 2 + 3)]
    assert_close(
        mean_hidden_embedding(model, [long]), mean_hidden_embedding(model, [long[-BLOCK:]])
    )


def test_mean_hidden_embedding_rejects_empty_inputs():
    model = tiny_model("gpt")
    with pytest.raises(LMError):
        mean_hidden_embedding(model, [])
    with pytest.raises(LMError):
        mean_hidden_embedding(model, [[1], []])


def test_token_is_its_own_nearest_neighbour(checkpoint_dir):
    neighbors = nearest_tokens(checkpoint_dir, "o", k=5)
    assert len(neighbors) == 5
    assert neighbors[0].token == "o" and neighbors[0].rank == 1
    assert neighbors[0].similarity == pytest.approx(1.0, abs=1e-5)
    similarities = [n.similarity for n in neighbors]
    assert similarities == sorted(similarities, reverse=True)
    assert len({n.token_id for n in neighbors}) == 5
    assert nearest_tokens(checkpoint_dir, "o", k=5) == neighbors  # deterministic


def test_nearest_tokens_matches_cosine_similarity(checkpoint_dir):
    checkpoint = load_checkpoint(checkpoint_dir)
    vocab = checkpoint.tokenizer.vocab_size
    neighbors = nearest_tokens(checkpoint, "a", k=vocab + 10)  # k larger than the vocabulary
    assert len(neighbors) == vocab
    weight = checkpoint.model.wte.weight.detach()
    a = checkpoint.tokenizer.token_to_id("a")
    for n in neighbors[:4]:
        cosine = torch.cosine_similarity(weight[a], weight[n.token_id], dim=0).item()
        assert n.similarity == pytest.approx(cosine, abs=1e-5)


def test_unknown_token_is_an_error(checkpoint_dir):
    with pytest.raises(LMError, match="not in the vocabulary"):
        nearest_tokens(checkpoint_dir, "Z")
    with pytest.raises(LMError):
        nearest_tokens(checkpoint_dir, "o", k=0)


def test_cli_neighbors(checkpoint_dir, capsys):
    assert main(["neighbors", "--checkpoint", str(checkpoint_dir), " ", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "token", "similarity"]
    assert len(lines) == 4
    rank, rest = lines[1].split(maxsplit=1)
    token, similarity = rest.rsplit(maxsplit=1)
    assert (rank, token) == ("1", "' '")  # whitespace shown as its repr
    assert float(similarity) == pytest.approx(1.0, abs=1e-4)


def test_cli_neighbors_unknown_token_exit_2(checkpoint_dir, capsys):
    assert main(["neighbors", "--checkpoint", str(checkpoint_dir), "Z"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm neighbors: error:") and len(err.strip().splitlines()) == 1
