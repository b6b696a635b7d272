"""In-context-learning tasks: the task functions, the corpus format, held-out words and
parameters, the accuracy evaluation, and `lm make-tasks` / `lm fewshot-eval`."""

from __future__ import annotations

import json
import re
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
    ALPHABET,
    CATEGORIES,
    HELDOUT_PAIRS,
    MAX_TRAIN_LENGTH,
    PRIMITIVE_FAMILIES,
    SEEN_TASKS,
    UNSEEN_TASKS,
    accuracy_table,
    episode_prompt,
    eval_episodes,
    fewshot_accuracy,
    is_heldout,
    make_corpus,
    make_corpus_and_mask,
    train_compositions,
    word_list,
)

TRAIN_TASKS = [task for family in PRIMITIVE_FAMILIES for task in family] + list(
    train_compositions()
)


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


def consistent(task, pairs) -> bool:
    if task.inputs == "digits" and not all(left.isdigit() for left, _ in pairs):
        return False
    return all(task.apply(left) == right for left, right in pairs)


@pytest.fixture(scope="module")
def corpus() -> str:
    return make_corpus(1500, seed=0, version=2)


@pytest.fixture(scope="module")
def corpus_v3() -> str:
    return make_corpus(3000, seed=0, version=3)


def episode_pairs(block: str, template: str) -> list[tuple[str, str]] | None:
    """(input, output) pairs of an episode written wholly in `template`, or None."""
    head, middle, tail = tasks.split_template(template)
    line = re.escape(head) + r"([^\n]+?)" + re.escape(middle) + r"([^\n]+?)" + re.escape(tail)
    if not re.fullmatch(f"(?:{line})+", block):
        return None
    return re.findall(line, block)


def parse_v3(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Episodes of a v3 corpus as (template, pairs); fails on an episode in no template."""
    assert text.endswith("\n") and not text.endswith("\n\n")
    parsed = []
    for block in text[:-1].split("\n\n"):
        block += "\n"
        readings = [
            (template, pairs)
            for template, _ in tasks.TRAIN_TEMPLATES
            if (pairs := episode_pairs(block, template)) is not None
        ]
        assert readings, block
        # "Input: a\nOutput: b\n" also reads as two "{input}: {output}" lines: the most
        # specific template (the longest literal text) is the one written
        parsed.append(max(readings, key=lambda r: len(r[0].format(input="", output=""))))
    return parsed


@pytest.fixture(scope="module")
def episodes(corpus) -> list[list[tuple[str, str]]]:
    return parse_corpus(corpus)


@pytest.mark.parametrize(
    "function, text, expected",
    [
        (tasks.reverse, "garden", "nedrag"),
        (tasks.upper, "Castle", "CASTLE"),
        (tasks.lower, "CaStLe", "castle"),
        (tasks.swapcase, "CaStLe", "cAsTlE"),
        (tasks.capitalize, "cASTLE", "Castle"),
        (tasks.sort_letters, "garden", "adegnr"),
        (tasks.repeat, "zorta", "zorta zorta"),
        (tasks.swap_pairs, "garden", "agdrne"),
        (tasks.swap_pairs, "apple", "palpe"),
        (tasks.double_letters, "cat", "ccaatt"),
        (tasks.drop_vowels, "Apple pie", "ppl p"),
        (tasks.dashes, "cat", "c-a-t"),
        (tasks.digits_to_words, "907", "nine zero seven"),
        (tasks.length, "garden", "6"),
    ],
)
def test_task_functions(function, text, expected):
    assert function(text) == expected


def test_parametrised_primitives():
    assert tasks.shift("abc", 3) == "def"
    assert tasks.shift("xyz", 3) == "abc"
    assert tasks.shift("Zoo42", 1) == "App42"  # case kept, digits stay
    assert tasks.rotate("garden", 2) == "rdenga"
    assert tasks.rotate("ab", 3) == "ba"  # modulo the length
    assert tasks.first("garden", 3) == "gar" and tasks.last("garden", 3) == "den"
    assert tasks.first("ox", 3) == "ox"
    composed = tasks.PRIMITIVES["reverse"].then(tasks.PRIMITIVES["capitalize"])
    assert composed.name == "reverse|capitalize" and composed.apply("apple") == "Elppa"


def test_task_space_is_large_and_names_are_unique():
    names = [task.name for task in TRAIN_TASKS]
    assert len(names) == len(set(names)) and len(names) > 1000
    assert {t.name for t in SEEN_TASKS} <= set(names)
    assert not {t.name for t in UNSEEN_TASKS} & set(names)


def test_corpus_is_deterministic_by_seed():
    assert make_corpus(40, seed=5) == make_corpus(40, seed=5)
    assert make_corpus(40, seed=5) != make_corpus(40, seed=6)
    for category in CATEGORIES:
        first = list(eval_episodes(category, 20, seed=1, shots=3))
        assert first == list(eval_episodes(category, 20, seed=1, shots=3))
        assert first != list(eval_episodes(category, 20, seed=2, shots=3))


def test_corpus_episodes_parse_and_each_is_one_training_task(episodes, corpus):
    assert len(episodes) == 1500
    assert corpus.endswith("\n") and not corpus.endswith("\n\n")
    for pairs in episodes[:300]:
        assert tasks.EPISODE_LINES[0] <= len(pairs) <= tasks.EPISODE_LINES[1]
        assert len({left for left, _ in pairs}) == len(pairs)  # distinct inputs
        assert any(consistent(task, pairs) for task in TRAIN_TASKS), pairs


def test_task_mix_many_tasks_few_times_each():
    """A Zipfian mix: hundreds of distinct tasks in 1,500 episodes, most of them rare."""
    import random

    rng = random.Random(0)
    names = [tasks.draw_train_task(rng, version=3).name for _ in range(1500)]
    counts = {name: names.count(name) for name in set(names)}
    assert len(counts) > 300
    assert sum(1 for n in counts.values() if n <= 3) > len(counts) / 2
    assert 0.4 < sum(1 for name in names if "|" in name) / len(names) < 0.6  # compositions
    assert max(counts.values()) < 0.1 * len(names)


def test_corpus_covers_lengths_case_digits_and_real_words(episodes, corpus):
    inputs = [left for pairs in episodes for left, _ in pairs]
    assert {len(x) for x in inputs} >= set(range(1, MAX_TRAIN_LENGTH + 1))
    assert max(len(x) for x in inputs) == MAX_TRAIN_LENGTH
    assert any(x.islower() and x.isalpha() for x in inputs)
    assert any(x.isupper() for x in inputs)
    assert any(x[0].isupper() and x[1:].islower() and len(x) > 2 for x in inputs)
    assert any(not x.isupper() and not x.islower() and not x.istitle() for x in inputs)
    assert any(x.isalnum() and not x.isalpha() and not x.isdigit() for x in inputs)
    assert any(x.isdigit() for x in inputs)
    words = {w for ws in word_list("train").values() for w in ws}
    real = [x for x in inputs if x.lower() in words and len(x) > 3]
    assert len(real) > len(inputs) / 3
    assert set(corpus) == set(ALPHABET)  # the char tokenizer covers every evaluation prompt


def test_wordlists_are_disjoint_and_split_by_the_hash():
    train = {w for ws in word_list("train").values() for w in ws}
    heldout = {w for ws in word_list("heldout").values() for w in ws}
    assert len(train) > 20_000 and len(heldout) > 2_000
    assert not train & heldout
    assert all(is_heldout(w) for w in heldout) and not any(is_heldout(w) for w in train)
    assert max(map(len, train)) == MAX_TRAIN_LENGTH
    assert max(map(len, heldout)) > MAX_TRAIN_LENGTH
    assert {"garden", "castle", "apple"} <= train | heldout


def test_heldout_inputs_never_appear_in_training(corpus):
    tokens = corpus.replace("=>", " ").split()
    assert not [t for t in tokens if is_heldout(t)]
    seen = {t.lower() for t in tokens}
    for category in CATEGORIES:
        episodes = list(eval_episodes(category, 60, seed=0, shots=2))
        inputs = {e.query for e in episodes} | {x.input for e in episodes for x in e.examples}
        assert all(is_heldout(x) for x in inputs)
        assert not {x.lower() for x in inputs} & seen


def test_unseen_task_variants_never_in_training(episodes):
    """No training episode (of lowercase words, the inputs "unseen" is scored on) is an
    episode of a held-out variant: not shift by 3, rotate by 3, nor a held-out pair."""
    for task in UNSEEN_TASKS:
        hits = [
            pairs
            for pairs in episodes
            if consistent(task, pairs)
            and any(left.islower() and left.isalpha() and len(left) >= 4 for left, _ in pairs)
        ]
        assert not hits, (task.name, hits[:1])
    names = {task.name for task in TRAIN_TASKS}
    for pair in HELDOUT_PAIRS:
        a, b = sorted(pair)
        assert f"{a}|{b}" not in names and f"{b}|{a}" not in names
    assert "shift1" in names and "shift3" not in names and "rotate3" not in names


def test_build_prompt_of_an_episode_is_the_training_text(corpus):
    first = corpus.split("\n\n")[0] + "\n"
    examples = [Example(left, right) for left, right in parse_corpus(first)[0]]
    prompt, stop = build_prompt(examples[:-1], examples[-1].input)
    assert prompt + examples[-1].output + stop[0] == first
    assert tasks.format_episode(examples) == first


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_eval_episodes_are_consistent_across_shots(category):
    few = list(eval_episodes(category, 40, seed=3, shots=2))
    many = list(eval_episodes(category, 40, seed=3, shots=8))
    by_name = {t.name: t for t in tasks.eval_tasks(category)}
    assert {e.task for e in few} == set(by_name)  # every task, equally often
    for a, b in zip(few, many):
        assert (a.task, a.query, a.answer) == (b.task, b.query, b.answer)
        assert a.examples == b.examples[:2] and len(b.examples) == 8
        assert a.answer == by_name[a.task].apply(a.query)
        assert all(ex.input != a.query for ex in b.examples)
        assert all(ex.output == by_name[a.task].apply(ex.input) for ex in b.examples)
    prompt, stop = episode_prompt(few[0].examples, few[0].query)
    assert prompt == "\n" + tasks.format_episode(few[0].examples) + few[0].query + " => "
    assert stop == ["\n"]


def test_eval_categories_draw_what_they_say():
    heldout = {w for ws in word_list("heldout").values() for w in ws}
    words = list(eval_episodes("words", 100, shots=1))
    assert all(e.query.lower() in heldout and len(e.query) <= MAX_TRAIN_LENGTH for e in words)
    assert any(not e.query.islower() for e in words)  # case styles as in training
    random_strings = [e.query for e in eval_episodes("random", 100, shots=1)]
    assert sum(s.lower() in heldout for s in random_strings) < 5
    assert any(any(c.isdigit() for c in s) for s in random_strings)
    long = [e.query for e in eval_episodes("long", 100, shots=1)]
    assert all(MAX_TRAIN_LENGTH < len(s) <= tasks.MAX_WORD_LENGTH for s in long)
    unseen = list(eval_episodes("unseen", 100, shots=1))
    assert all(e.query in heldout and e.query.islower() for e in unseen)
    assert {e.task for e in unseen} == {t.name for t in UNSEEN_TASKS}


def test_bad_counts_and_categories_are_errors():
    with pytest.raises(LMError):
        make_corpus(0)
    with pytest.raises(LMError):
        next(eval_episodes("words", 5, shots=-1))
    with pytest.raises(LMError, match="category"):
        next(eval_episodes("nope", 5))


def tiny_checkpoint(directory: Path, kind: str) -> Path:
    from lm.tokenizers import CharTokenizer

    tokenizer = CharTokenizer.train(ALPHABET)
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


def all_episodes(shots_list, n, seed=0):
    return [
        e
        for shots in shots_list
        for category in CATEGORIES
        for e in eval_episodes(category, n, seed=seed, shots=shots)
    ]


def test_fewshot_accuracy_scores_exact_matches(tmp_path, monkeypatch):
    """Right answers that stopped score 1; extra text or no stop scores 0."""
    checkpoint = tiny_checkpoint(tmp_path / "gpt", "gpt")
    answers = [e.answer for e in all_episodes([0, 2], 6)]
    replies = [(a, "stop") for a in answers]

    def fake_complete(self, prompts, params, n=1):
        assert len(prompts) == len(answers) and params.temperature == 0.0
        return [
            Completion(i, text, reason, [], None, 0) for i, (text, reason) in enumerate(replies)
        ]

    monkeypatch.setattr(Generator, "complete", fake_complete)
    result = fewshot_accuracy(checkpoint, [2, 0], episodes=6, seed=0)
    assert list(result) == [0, 2]
    for row in result.values():
        assert set(row) == {*CATEGORIES, "overall", "per_task"}
        assert all(row[c] == 1.0 for c in (*CATEGORIES, "overall"))
        assert set(row["per_task"]) == set(CATEGORIES)
        assert all(set(v.values()) == {1.0} for v in row["per_task"].values())
    replies[:] = [(a + " x", "stop") if i % 2 else (a, "length") for i, a in enumerate(answers)]
    assert fewshot_accuracy(checkpoint, [0, 2], episodes=6)[2]["overall"] == 0.0


def test_fewshot_accuracy_scores_each_category_apart(tmp_path, monkeypatch):
    """Each category has its own score; "overall" pools them."""
    checkpoint = tiny_checkpoint(tmp_path / "gpt", "gpt")
    n = 20
    categories = [c for c in CATEGORIES for _ in range(n)]
    episodes = all_episodes([1], n)
    right = {"words": n, "random": n // 2, "long": 0, "unseen": n // 4}

    def fake_complete(self, prompts, params, n_=1):
        counts: dict[str, int] = {}
        replies = []
        for i, (category, e) in enumerate(zip(categories, episodes)):
            counts[category] = counts.get(category, 0) + 1
            ok = counts[category] <= right[category]
            replies.append(Completion(i, e.answer if ok else "wrong", "stop", [], None, 0))
        return replies

    monkeypatch.setattr(Generator, "complete", fake_complete)
    row = fewshot_accuracy(checkpoint, [1], episodes=n, seed=0)[1]
    assert row["words"] == 1.0 and row["random"] == 0.5
    assert row["long"] == 0.0 and row["unseen"] == 0.25
    assert row["overall"] == pytest.approx(sum(right.values()) / (4 * n))
    assert set(row["per_task"]["unseen"]) == {t.name for t in UNSEEN_TASKS}
    assert "length" not in row["per_task"]["long"]
    table = accuracy_table({1: row})
    assert table.splitlines()[0].split() == ["shots", *CATEGORIES, "overall"]
    assert "shift3" in table and "per task at 1 shots" in table


def test_cli_make_tasks_versions_are_lm_tasks_versions():
    from lm.commands import make_tasks

    assert make_tasks.VERSIONS == tasks.CORPUS_VERSIONS
    assert make_tasks.DEFAULT_VERSION == tasks.LATEST_VERSION


def test_cli_make_tasks_writes_the_corpus(tmp_path, capsys):
    out = tmp_path / "sub" / "tasks.txt"
    assert main(["make-tasks", "--out", str(out), "--episodes", "25", "--seed", "4"]) == 0
    assert out.read_text(encoding="utf-8") == make_corpus(25, seed=4, version=5)
    assert "25 episodes" in capsys.readouterr().out
    args = ["make-tasks", "--out", str(out), "--episodes", "25", "--seed", "4", "--version", "2"]
    assert main(args) == 0
    assert out.read_text(encoding="utf-8") == make_corpus(25, seed=4, version=2)
    assert "version 2" in capsys.readouterr().out


def test_answer_mask_marks_each_answer_and_its_line_end(corpus_v3):
    text, mask = make_corpus_and_mask(3000, seed=0, version=3)
    assert text == corpus_v3  # the mask changes nothing in the corpus
    expected = []
    for template, pairs in parse_v3(text):
        head, middle, tail = tasks.split_template(template)
        for source, answer in pairs:
            expected.append(bytes(len(head + source + middle)) + b"\1" * len(answer + tail))
        expected.append(b"\0")  # the blank line between episodes
    assert mask == b"".join(expected)[:-1]


def test_cli_make_tasks_writes_the_mask(tmp_path, capsys):
    out, mask = tmp_path / "tasks.txt", tmp_path / "sub" / "tasks.mask"
    args = ["make-tasks", "--out", str(out), "--episodes", "30", "--seed", "2", "--mask", str(mask)]
    assert main(args) == 0
    text, expected = make_corpus_and_mask(30, seed=2)
    assert out.read_text(encoding="utf-8") == text
    assert mask.read_bytes() == expected and len(expected) == len(text)
    assert "answer mask" in capsys.readouterr().out


# -- corpus version 3: templates and punctuation -------------------------------------------


@pytest.mark.parametrize(
    ("version", "digest"),
    [
        (2, "26f6eb7ddebab14a"),
        (3, "d1a6e1d77273b790"),
        (4, "5363392580670e77"),
        (5, "a89cf42b07fc9a72"),
        (6, "bf2a7ddd5a201db7"),
    ],
)
def test_older_corpora_are_the_ones_their_models_trained_on(version, digest):
    """Later versions came later: an older version's text must not move (recipes
    regenerate it)."""
    import hashlib

    text = make_corpus(2000, seed=1234, version=version)
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest
    assert make_corpus(50, seed=3) == make_corpus(50, seed=3, version=tasks.LATEST_VERSION)
    with pytest.raises(LMError, match="corpus version"):
        make_corpus(5, version=max(tasks.CORPUS_VERSIONS) + 1)


def test_v3_episodes_each_use_one_training_template(corpus_v3):
    parsed = parse_v3(corpus_v3)
    assert len(parsed) == 3000
    counts = {template: 0 for template, _ in tasks.TRAIN_TEMPLATES}
    for template, pairs in parsed:
        counts[template] += 1
        assert tasks.EPISODE_LINES[0] <= len(pairs) <= tasks.EPISODE_LINES[1]
    for template, share in tasks.TRAIN_TEMPLATES:  # every template, near its share
        assert abs(counts[template] / 3000 - share) < 0.03, template
    for template in tasks.HELDOUT_TEMPLATES:
        head, middle, _ = tasks.split_template(template)
        assert (head + "x" + middle).strip() not in corpus_v3.replace("x", "")
        assert not any(episode_pairs(b + "\n", template) for b in corpus_v3.split("\n\n")[:200])


def test_v3_episodes_are_training_tasks_over_any_printable_ascii(corpus_v3):
    parsed = parse_v3(corpus_v3)
    for _, pairs in parsed[:400]:
        assert len({left for left, _ in pairs}) == len(pairs)
        assert any(consistent(task, pairs) for task in TRAIN_TASKS), pairs
    inputs = [left for _, pairs in parsed for left, _ in pairs]
    assert set(corpus_v3) == set(tasks.ALPHABET_V3)  # the vocabulary: all printable ASCII
    assert sum(any(c in tasks.SYMBOLS for c in x) for x in inputs) > len(inputs) / 20
    assert not [x for x in inputs if is_heldout(x)]


def composition_draws(version: int, n: int) -> tuple[list[str], list[str], list[int]]:
    """`n` training tasks drawn as corpus `version` draws them (seeded): their names, the
    compositions among them (about half) and how many fell in each family pair."""
    import random

    rng = random.Random(0)
    draws = [tasks.draw_train_task(rng, version=version).name for _ in range(n)]
    composed = [name for name in draws if "|" in name]
    assert 0.45 < len(composed) / len(draws) < 0.55
    groups = tasks.family_pair_compositions()
    group_of = {task.name: index for index, group in enumerate(groups) for task in group}
    per_group = [0] * len(groups)
    for name in composed:
        per_group[group_of[name]] += 1
    return draws, composed, per_group


def assert_pairs_by_square_root_of_size(composed: list[str], per_group: list[int]) -> None:
    groups = tasks.family_pair_compositions()
    total = sum(len(group) ** 0.5 for group in groups)
    for group, count in zip(groups, per_group):
        expected = len(composed) * len(group) ** 0.5 / total
        assert 0.6 * expected < count < 1.5 * expected, group[0].name


def test_v4_draws_compositions_by_family_pair():
    """Version 4: the same tasks as version 3, but each pair of primitive families gets an
    equal share of the compositions (v3's Zipfian ranks gave one 12.5%, others ~0.01%)."""
    groups = tasks.family_pair_compositions()
    flat = [task.name for group in groups for task in group]
    assert sorted(flat) == sorted(task.name for task in tasks.train_compositions())
    draws, composed, per_group = composition_draws(version=4, n=20_000)
    expected = len(composed) / len(groups)  # ~71 each
    assert min(per_group) > 0.5 * expected and max(per_group) < 1.6 * expected
    # The pairs v3 all but left out are now seen as often as any other.
    assert sum(name.startswith("reverse|double") for name in composed) > 0.5 * expected
    unseen = {task.name for task in UNSEEN_TASKS}
    assert not unseen & set(draws)


def test_v5_weights_family_pairs_by_the_square_root_of_their_size():
    """Version 5: a pair of families with 24 parameters (shift then reverse) is drawn
    sqrt(24) ~ 4.9 times as often as a pair of single tasks (reverse then double), so
    composing a shift with a reordering is no longer starved; every pair still occurs."""
    draws, composed, per_group = composition_draws(version=5, n=40_000)
    assert_pairs_by_square_root_of_size(composed, per_group)
    shift_reverse = sum(name.startswith("shift") and name.endswith("|reverse") for name in composed)
    reverse_double = composed.count("reverse|double")
    assert 3 < shift_reverse / reverse_double < 8
    assert not {task.name for task in UNSEEN_TASKS} & set(draws)


def test_v6_draws_each_steps_parameter_by_zipf_rank():
    """Version 6: the family pairs as version 5, then each step's parameter by Zipf rank, so
    shift by 1 then reverse is ~1 / H(24) ~ 26% of the shift-then-reverse compositions
    (v5: 1 / 24), and shift by 2 half of that; every parameter still occurs."""
    draws, composed, per_group = composition_draws(version=6, n=40_000)
    assert_pairs_by_square_root_of_size(composed, per_group)  # as version 5
    shift_reverse = [n for n in composed if n.startswith("shift") and n.endswith("|reverse")]
    harmonic = sum(1 / rank for rank in range(1, len(tasks.TRAIN_SHIFTS) + 1))
    share = shift_reverse.count("shift1|reverse") / len(shift_reverse)
    assert abs(share - 1 / harmonic) < 0.08
    assert 1.4 < shift_reverse.count("shift1|reverse") / shift_reverse.count("shift2|reverse") < 2.8
    shift_first = [n.split("|")[0] for n in composed if n.startswith("shift")]
    assert {f"shift{k}" for k in tasks.TRAIN_SHIFTS} == set(shift_first)
    assert not {task.name for task in UNSEEN_TASKS} & set(draws)


def test_v7_draws_primitive_families_by_the_square_root_of_their_size():
    """Version 7: the compositions as version 6; a primitive's family by the square root of
    its number of tasks, so shift by k (24 values) is ~20% of the primitives (v6: 1 in 17),
    each value still drawn evenly; every primitive still occurs."""
    import collections
    import random

    rng = random.Random(0)
    draws = [tasks.draw_train_task(rng, version=7).name for _ in range(40_000)]
    primitives = [name for name in draws if "|" not in name]
    families = collections.Counter(name.rstrip("0123456789") for name in primitives)
    total = sum(len(family) ** 0.5 for family in tasks.PRIMITIVE_FAMILIES)
    assert abs(families["shift"] / len(primitives) - 24**0.5 / total) < 0.02
    assert abs(families["reverse"] / len(primitives) - 1 / total) < 0.01
    shifts = collections.Counter(name for name in primitives if name.startswith("shift"))
    assert set(shifts) == {f"shift{k}" for k in tasks.TRAIN_SHIFTS}
    assert max(shifts.values()) < 1.5 * min(shifts.values())  # parameters stay even
    assert set(primitives) == set(tasks.PRIMITIVES)
    composed = [name for name in draws if "|" in name]
    assert abs(composed.count("shift1|reverse") / len(composed) - 0.0034) < 0.0015  # as v6
    assert not {task.name for task in UNSEEN_TASKS} & set(draws)


def test_family_pairs_compose_whole_families():
    """Version 6 draws each step of a pair on its own: every task of a pair's first family
    composes with every task of its second."""
    import itertools

    for first, second in tasks.family_pairs():
        assert all(tasks._composable(a, b) for a, b in itertools.product(first, second))
    assert sum(len(group) for group in tasks.family_pair_compositions()) == 1616


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_v4_to_v7_corpus_episodes_are_training_tasks(version):
    text = make_corpus(400, seed=0, version=version)
    parsed = parse_v3(text)
    assert len(parsed) == 400
    for _, pairs in parsed:
        assert any(consistent(task, pairs) for task in TRAIN_TASKS), pairs


def test_v3_examples_never_hold_their_templates_separators():
    fits = tasks._fits("{input}: {output}\n")
    assert fits("a;b", "b;a") and not fits("a:b", "b") and not fits("ab", "a:b")
    assert not fits("ab", "") and not fits("a\tb", "x")
    arrow = tasks._fits("{input} -> {output}\n")
    assert arrow("a-b", "b-a") and not arrow("a->b", "x")


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
            for key in (*CATEGORIES, "overall"):
                assert 0.0 <= row[key] <= 1.0
            assert set(row["per_task"]) == set(CATEGORIES)
            assert all(0.0 <= v <= 1.0 for v in row["per_task"]["words"].values())
    assert plot.stat().st_size > 0


def test_cli_fewshot_eval_table(tmp_path, capsys):
    gpt = tiny_checkpoint(tmp_path / "gpt", "gpt")
    assert main(["fewshot-eval", "--checkpoint", str(gpt), "--shots", "1", "--episodes", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["shots", *CATEGORIES, "overall"]
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


def test_cli_fewshot_eval_with_a_users_template(tmp_path, capsys):
    gpt = tiny_checkpoint(tmp_path / "gpt", "gpt")
    args = ["fewshot-eval", "--checkpoint", str(gpt), "--shots", "1", "--episodes", "2"]
    assert main([*args, "--template", "Q: {input}\nA: {output}\n\n"]) == 0
    assert "template 'Q: {input}\\nA: {output}\\n\\n'" in capsys.readouterr().out
    examples = [Example("apple", "elppa")]
    prompt, stop = episode_prompt(examples, "river", "Q: {input}\nA: {output}\n\n")
    assert prompt == "\nQ: apple\nA: elppa\n\nQ: river\nA: " and stop == ["\n\n"]


def test_cli_fewshot_eval_malformed_template_exit_2_before_loading(tmp_path, capsys):
    code = main(["fewshot-eval", "--checkpoint", str(tmp_path / "nope"), "--template", "{input}"])
    assert code == 2
    assert "template" in capsys.readouterr().err


# -- named tasks (lm fewshot-eval --task) ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "word", "output"),
    [
        ("reverse", "Garden", "nedraG"),
        ("shift3", "Garden", "Jdughq"),  # a parameter kept out of training
        ("first7", "gardening", "gardeni"),  # one never trained (first 1-5)
        ("rotate3", "Garden", "denGar"),
        ("shift1|reverse", "Garden", "ofesbH"),
        ("upper | shift2 | reverse", "abc", "EDC"),  # three steps, spaces allowed
    ],
)
def test_task_named_builds_primitives_parameters_and_compositions(name, word, output):
    task = tasks.task_named(name)
    assert task.apply(word) == output
    assert task.name == name.replace(" ", "")


def test_task_named_gives_the_trained_tasks_themselves():
    for task in (*SEEN_TASKS, *UNSEEN_TASKS, *tasks.train_compositions()[:50]):
        named = tasks.task_named(task.name)
        assert named.name == task.name
        assert all(named.apply(w) == task.apply(w) for w in ("Garden", "xyz", "a1B2c3d4e5"))


@pytest.mark.parametrize("name", ["shift0", "digits", "foo|reverse", "", "shift1|", "Reverse"])
def test_task_named_rejects_what_it_cannot_build(name):
    with pytest.raises(LMError, match="unknown task .* a task is one of reverse"):
        tasks.task_named(name)


def test_fewshot_accuracy_scores_given_tasks_on_each_kind_of_input(tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint(tmp_path / "gpt", "gpt")
    chosen = [tasks.task_named("shift2|reverse"), tasks.task_named("reverse")]

    def fake_complete(self, prompts, params, n=1):
        replies = []
        for i, prompt in enumerate(prompts):  # reverse right, shift2|reverse wrong
            query = prompt.rsplit("\n", 1)[1].removesuffix(" => ")
            replies.append(Completion(i, query[::-1], "stop", [], None, 0))
        return replies

    monkeypatch.setattr(Generator, "complete", fake_complete)
    row = fewshot_accuracy(checkpoint, [2], episodes=10, tasks=chosen)[2]
    assert row["unseen"] is None and row["per_task"]["unseen"] == {}
    for category in ("words", "random", "long"):
        assert row[category] == 0.5
        assert row["per_task"][category] == {"shift2|reverse": 0.0, "reverse": 1.0}
    assert "shift2|reverse" in accuracy_table({2: row})


def test_cli_fewshot_eval_given_tasks_and_a_bad_one(tmp_path, capsys):
    gpt = tiny_checkpoint(tmp_path / "gpt", "gpt")
    args = ["fewshot-eval", "--checkpoint", str(gpt), "--shots", "1", "--episodes", "2"]
    plot = tmp_path / "acc.png"
    given = ["--task", "shift1|reverse", "--task", "first7", "--json", "--plot", str(plot)]
    assert main([*args, *given]) == 0
    assert plot.stat().st_size > 0  # no line for the empty "unseen"
    row = json.loads(capsys.readouterr().out)[str(gpt)]["1"]
    assert set(row["per_task"]["words"]) == {"shift1|reverse", "first7"}
    assert row["unseen"] is None
    assert main([*args, "--task", "shift0"]) == 2
    assert "unknown task 'shift0'" in capsys.readouterr().err
