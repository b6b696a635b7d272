"""The shipped checkpoints load, generate, and score what their cards say."""

from __future__ import annotations

import functools
import re

import pytest
import torch

from lm.checkpoint import (
    DEFAULT_CHECKPOINT,
    load_checkpoint,
    read_config,
    shipped_checkpoints,
    shipped_dir,
)
from lm.cli import main
from lm.data import corpus_hash
from lm.evaluate import evaluate_checkpoint

SHAKESPEARE = [
    "shakespeare-char-gpt",
    "shakespeare-char-lstm",
    "shakespeare-bpe-gpt",
    "shakespeare-word-lstm",
]
# The corpus the few-shot checkpoints were trained on: `lm make-tasks` in train_all.sh,
# episodes by corpus version (v5 made more than one run reads: no episode is seen twice).
FEWSHOT_EPISODES = {2: 300000, 3: 300000, 4: 300000, 5: 500000, 6: 500000, 7: 500000}
FEWSHOT_SEED = 1234
FEWSHOT_V1_CORPUS = "fewshot-tasks.txt"  # made by lm/tasks.py before issue 13; gone
# The few-shot cards' losses are over the whole validation split (1.3M tokens of uniform
# random episodes); the test scores its first quarter of a million, within a wider
# tolerance (the v3 LSTM: 1.649 there against 1.624 on the whole; other weights are off by
# far more).
FEWSHOT_EVAL_TOKENS = 262_144
FEWSHOT_TOLERANCE = 0.04


def skip_fewshot_v1(meta: dict) -> None:
    corpus = meta["training"].get("corpus", [""])[0]
    if corpus.replace("\\", "/").rsplit("/", 1)[-1] == FEWSHOT_V1_CORPUS:
        pytest.skip(
            "trained on the v1 task corpus, which lm make-tasks no longer makes: "
            "retrain with its newest recipe-vN.toml (checkpoints/train_all.sh)"
        )


@functools.cache
def task_corpus(version: int) -> tuple[str, bytes]:
    """The few-shot checkpoints' training corpus and its answer mask (about a minute to
    make): made once for both of the version's checkpoints."""
    from lm.tasks import make_corpus_and_mask

    return make_corpus_and_mask(FEWSHOT_EPISODES[version], FEWSHOT_SEED, version=version)


def card_loss(name: str) -> float:
    card = (shipped_dir() / name / "README.md").read_text(encoding="utf-8")
    match = re.search(r"\| validation loss \| ([0-9.]+) \|", card)
    assert match, f"{name}: the card states no validation loss"
    return float(match.group(1))


def test_the_shakespeare_models_and_the_default_are_shipped():
    names = shipped_checkpoints()
    assert DEFAULT_CHECKPOINT in names
    for name in SHAKESPEARE:
        assert name in names


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", shipped_checkpoints())
def test_validation_loss_matches_the_card(name, shakespeare_path, tmp_path, two_threads):
    meta = read_config(shipped_dir() / name)
    max_tokens, loss_mask = None, None
    if name.startswith("fewshot"):
        skip_fewshot_v1(meta)
        version = int(re.search(r"-v(\d+)\.txt$", meta["training"]["corpus"][0])[1])
        text, mask = task_corpus(version)
        corpus = tmp_path / "tasks.txt"
        corpus.write_text(text, encoding="utf-8")
        max_tokens = FEWSHOT_EVAL_TOKENS
        if meta["training"]["settings"].get("loss_mask"):  # trained (and scored) on answers
            (tmp_path / "tasks.mask").write_bytes(mask)
            loss_mask = [str(tmp_path / "tasks.mask")]
    else:
        corpus = shakespeare_path
        text = corpus.read_text(encoding="utf-8")
    assert corpus_hash(text) == meta["training"]["corpus_hash"], "not the training corpus"
    result = evaluate_checkpoint(
        name, [str(corpus)], split="val", max_tokens=max_tokens, device="cpu", loss_mask=loss_mask
    )
    tolerance = 0.02 if max_tokens is None else FEWSHOT_TOLERANCE
    assert abs(result["loss"] - card_loss(name)) <= tolerance


@pytest.mark.parametrize("name", shipped_checkpoints())
def test_every_shipped_checkpoint_is_finished_and_generates(name):
    from lm.generate import Generator
    from lm.sampling import SamplingParams

    checkpoint = load_checkpoint(name)
    assert checkpoint.training.get("finished"), f"{name} did not finish training"
    assert (shipped_dir() / name / "recipe.toml").is_file()
    [completion] = Generator(checkpoint).complete(
        ["The "], SamplingParams(max_new_tokens=8, seed=0)
    )
    assert len(completion.token_ids) == 8


def test_generate_with_the_default_checkpoint(capsys):
    assert main(["generate", "ROMEO:", "--max-new-tokens", "40", "--seed", "7"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "ROMEO:", "--max-new-tokens", "40", "--seed", "7"]) == 0
    assert capsys.readouterr().out == first
    assert len(first.strip()) > 10


def test_checkpoints_lists_kind_size_and_loss(capsys):
    assert main(["checkpoints"]) == 0
    out = capsys.readouterr().out
    for name in SHAKESPEARE:
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert f"{card_loss(name):.4f}" in line


@pytest.mark.parametrize("name", shipped_checkpoints())
def test_recipe_and_config_name_the_corpus_portably(name, shakespeare_path):
    """The config records file names (plus the hash), the recipe a path relative to itself."""
    from lm.train import read_recipe

    directory = shipped_dir() / name
    training = read_config(directory)["training"]
    recorded = training["corpus"]
    assert all("/" not in c and "\\" not in c for c in recorded), recorded
    assert training["settings"]["corpus"] == recorded
    recipe = read_recipe(directory / "recipe.toml")
    corpus = [(directory / c).resolve() for c in recipe["corpus"]]
    assert [c.name for c in corpus] == recorded
    if name in SHAKESPEARE:  # ships in the repository's data/; fewshot ones are generated
        assert corpus == [shakespeare_path.resolve()]
        assert corpus_hash(corpus[0].read_text(encoding="utf-8")) == training["corpus_hash"]


@pytest.mark.parametrize(
    "recipe",
    sorted(shipped_dir().glob("*/recipe*.toml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_every_recipe_is_a_valid_training_config(recipe):
    """Recipes not trained yet (recipe-v3.toml, ...) too: a typo fails here, not an hour in."""
    from lm.train import TrainConfig, read_recipe

    settings = read_recipe(recipe)
    TrainConfig.from_dict(settings).validate()
    assert settings["corpus"] and all(not c.startswith("/") for c in settings["corpus"])
