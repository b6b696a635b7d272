"""In-context-learning tasks: the task functions, the corpus format, held-out words and
parameters, the accuracy evaluation, and `lm make-tasks` / `lm fewshot-eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lm import tasks
from lm.checkpoint import save_checkpoint
from lm.cli import main
from lm.errors import LMError
from lm.fewshot import Example, build_prompt
from lm.generate import Completion, Generator
from lm.models import ModelConfig, build_model
from lm.tasks import (
    EVAL_TASKS,
    HELDOUT_SHIFT,
    TRAIN_FAMILIES,
    TRAIN_SHIFTS,
    UNSEEN_TASKS,
    accuracy_table,
    episode_prompt,
    fewshot_accuracy,
    heldout_episodes,
    is_heldout,
    make_corpus,
)

TRAIN_TASKS = [task for family in TRAIN_FAMILIES for task in family]


def parse_corpus(text: str) -> list[list[tuple[str, str]]]:
    """Episodes as lists of (input, output); fails on any line not `input => output`."""
    episodes = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        pairs = []
        for line in lines:
            assert line.count(" => ") == 1, line
            left, right = line.split(" => ")
            assert left and right, line
            pairs.append((left, right))
        episodes.append(pairs)
    return episodes


@pytest.fixture(scope="module")
def corpus() -> str:
    return make_corpus(300, seed=0)


@pytest.mark.parametrize(
    "function, text, expected",
    [
        (tasks.reverse, "kotab", "batok"),
        (tasks.upper, "kotab", "KOTAB"),
        (tasks.capitalize, "kotab", "Kotab"),
        (tasks.sort_letters, "kotab", "abkot"),
        (tasks.repeat, "kotab", "kotab kotab"),
        (tasks.first_letter, "kotab", "k"),
        (tasks.last_letter, "kotab", "b"),
        (tasks.swap_pairs, "kotab", "okatb"),
        (tasks.swap_pairs, "kota", "okat"),
        (tasks.double_letters, "kot", "kkoott"),
        (tasks.digits_to_words, "42", "four two"),
        (tasks.digits_to_words, "907", "nine zero seven"),
        (tasks.length, "kotab", "5"),
    ],
)
def test_task_functions(function, text, expected):
    assert function(text) == expected


def test_shift_wraps_around():
    assert tasks.shift("abc", 3) == "def"
    assert tasks.shift("xyz", 3) == "abc"
    assert tasks.shift("kotab", 1) == "lpubc"


def test_corpus_is_deterministic_by_seed():
    assert make_corpus(40, seed=5) == make_corpus(40, seed=5)
    assert make_corpus(40, seed=5) != make_corpus(40, seed=6)
    first = list(heldout_episodes(20, seed=1, shots=3))
    assert first == list(heldout_episodes(20, seed=1, shots=3))
    assert first != list(heldout_episodes(20, seed=2, shots=3))


def test_corpus_episodes_parse_and_each_is_one_training_task(corpus):
    episodes = parse_corpus(corpus)
    assert len(episodes) == 300
    assert corpus.endswith("\n") and not corpus.endswith("\n\n")
    for pairs in episodes:
        assert tasks.EPISODE_LINES[0] <= len(pairs) <= tasks.EPISODE_LINES[1]
        assert len({left for left, _ in pairs}) == len(pairs)  # distinct inputs
        kind = "digits" if pairs[0][0].isdigit() else "word"
        assert any(
            all(task.apply(left) == right for left, right in pairs)
            for task in TRAIN_TASKS
            if task.inputs == kind
        ), pairs


def test_heldout_words_never_appear_in_training(corpus):
    tokens = corpus.replace("=>", " ").lower().split()
    assert not [t for t in tokens if is_heldout(t)]
    queries = {e.query for e in heldout_episodes(100, seed=0, shots=2)}
    assert all(is_heldout(q) for q in queries)
    assert not queries & set(tokens)


def test_heldout_shift_never_in_training(corpus):
    episodes = parse_corpus(corpus)

    def is_shift(pairs, k):
        return all(tasks.shift(left, k) == right for left, right in pairs)

    assert HELDOUT_SHIFT not in TRAIN_SHIFTS
    assert not any(is_shift(pairs, HELDOUT_SHIFT) for pairs in episodes)
    assert any(is_shift(pairs, TRAIN_SHIFTS[0]) for pairs in episodes)  # the check can fire


def test_build_prompt_of_an_episode_is_the_training_text(corpus):
    first = corpus.split("\n\n")[0] + "\n"
    examples = [Example(left, right) for left, right in parse_corpus(first)[0]]
    prompt, stop = build_prompt(examples[:-1], examples[-1].input)
    assert prompt + examples[-1].output + stop[0] == first
    assert tasks.format_episode(examples) == first


def test_heldout_episodes_are_consistent_across_shots():
    few = list(heldout_episodes(12, seed=3, shots=2))
    many = list(heldout_episodes(12, seed=3, shots=6))
    assert {e.task for e in few} == {t.name for t in EVAL_TASKS}  # every task, once each
    assert f"shift+{HELDOUT_SHIFT}" in {e.task for e in few}
    by_name = {t.name: t for t in EVAL_TASKS}
    for a, b in zip(few, many):
        assert (a.task, a.query, a.answer) == (b.task, b.query, b.answer)
        assert a.examples == b.examples[:2] and len(b.examples) == 6
        assert a.answer == by_name[a.task].apply(a.query)
        assert all(is_heldout(ex.input) and ex.input != a.query for ex in b.examples)
        assert all(ex.output == by_name[a.task].apply(ex.input) for ex in b.examples)
    prompt, stop = episode_prompt(few[0].examples, few[0].query)
    assert prompt == "\n" + tasks.format_episode(few[0].examples) + few[0].query + " => "
    assert stop == ["\n"]


def test_bad_counts_are_errors():
    with pytest.raises(LMError):
        make_corpus(0)
    with pytest.raises(LMError):
        next(heldout_episodes(5, shots=-1))


def tiny_checkpoint(directory: Path, kind: str) -> Path:
    from lm.tokenizers import CharTokenizer

    tokenizer = CharTokenizer.train(make_corpus(40, seed=0))
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            kind=kind,
            vocab_size=tokenizer.vocab_size,
            n_layer=1,
            n_embd=16,
            n_head=2,
            block_size=64,
        )
    )
    save_checkpoint(directory, model, tokenizer)
    return directory


def test_fewshot_accuracy_scores_exact_matches(tmp_path, monkeypatch):
    """Right answers that stopped score 1; extra text or no stop scores 0."""
    checkpoint = tiny_checkpoint(tmp_path / "gpt", "gpt")
    answers = [e.answer for shots in (0, 2) for e in heldout_episodes(6, seed=0, shots=shots)]
    replies = [(a, "stop") for a in answers]

    def fake_complete(self, prompts, params, n=1):
        assert len(prompts) == len(answers) and params.temperature == 0.0
        return [
            Completion(i, text, reason, [], None, 0) for i, (text, reason) in enumerate(replies)
        ]

    monkeypatch.setattr(Generator, "complete", fake_complete)
    result = fewshot_accuracy(checkpoint, [2, 0], episodes=6, seed=0)
    assert list(result) == [0, 2]
    assert result[0]["overall"] == 1.0 and set(result[2]["per_task"].values()) == {1.0}
    replies[:] = [(a + " x", "stop") if i % 2 else (a, "length") for i, a in enumerate(answers)]
    assert fewshot_accuracy(checkpoint, [0, 2], episodes=6)[2]["overall"] == 0.0


def test_fewshot_accuracy_scores_unseen_tasks_apart(tmp_path, monkeypatch):
    """shift+3 never occurs in training: it counts in "overall" and "unseen_tasks" only."""
    checkpoint = tiny_checkpoint(tmp_path / "gpt", "gpt")
    episodes = list(heldout_episodes(24, seed=0, shots=1))  # every task twice
    assert {e.task for e in episodes} == {t.name for t in EVAL_TASKS}

    def fake_complete(self, prompts, params, n=1):
        return [Completion(i, "wrong" if e.task in UNSEEN_TASKS else e.answer, "stop", [], None, 0)
                for i, e in enumerate(episodes)]

    monkeypatch.setattr(Generator, "complete", fake_complete)
    row = fewshot_accuracy(checkpoint, [1], episodes=24, seed=0)[1]
    assert row["seen_tasks"] == 1.0 and row["unseen_tasks"] == 0.0
    assert row["overall"] == pytest.approx(1 - 2 / 24)
    assert row["per_task"]["shift+3"] == 0.0
    assert "unseen" in accuracy_table({1: row}).splitlines()[0]


def test_cli_make_tasks_writes_the_corpus(tmp_path, capsys):
    out = tmp_path / "sub" / "tasks.txt"
    assert main(["make-tasks", "--out", str(out), "--episodes", "25", "--seed", "4"]) == 0
    assert out.read_text(encoding="utf-8") == make_corpus(25, seed=4)
    assert "25 episodes" in capsys.readouterr().out


def test_cli_fewshot_eval_json_and_plot(tmp_path, capsys):
    gpt = tiny_checkpoint(tmp_path / "gpt", "gpt")
    lstm = tiny_checkpoint(tmp_path / "lstm", "lstm")
    plot = tmp_path / "acc.png"
    code = main(
        [
            "fewshot-eval",
            "--checkpoint",
            str(gpt),
            "--checkpoint",
            str(lstm),
            "--shots",
            "0,1",
            "--episodes",
            "4",
            "--json",
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {str(gpt), str(lstm)}
    for per_shots in result.values():
        assert set(per_shots) == {"0", "1"}
        for row in per_shots.values():
            assert 0.0 <= row["overall"] <= 1.0
            assert len(row["per_task"]) == 4
            assert all(0.0 <= v <= 1.0 for v in row["per_task"].values())
    assert plot.stat().st_size > 0


def test_cli_fewshot_eval_table(tmp_path, capsys):
    gpt = tiny_checkpoint(tmp_path / "gpt", "gpt")
    assert main(["fewshot-eval", "--checkpoint", str(gpt), "--shots", "1", "--episodes", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["shots", "overall"]
    assert lines[2].split()[0] == "1" and lines[2].endswith("%")


@pytest.mark.parametrize("shots", ["1,x", "-1", "", "1;2"])
def test_cli_fewshot_eval_malformed_shots_exit_2(tmp_path, shots, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fewshot-eval", "--checkpoint", str(tmp_path), "--shots", shots])
    assert exc.value.code == 2
    assert "--shots" in capsys.readouterr().err


def test_cli_fewshot_eval_missing_checkpoint_exit_2(tmp_path, capsys):
    code = main(["fewshot-eval", "--checkpoint", str(tmp_path / "nope"), "--episodes", "1"])
    assert code == 2
    assert capsys.readouterr().err.startswith("lm fewshot-eval: error:")
