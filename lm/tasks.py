"""In-context learning: a corpus of few-shot episodes to train on, and held-out episodes that
measure whether a model infers a task from its examples alone.

An episode is a handful of `input => output` lines (lm.fewshot's default template) for one
string task over random pronounceable words; episodes are separated by a blank line. One
word in ten (chosen by a hash of the word) and the shift amount 3 never occur in training,
so evaluation queries are words, and a parameter, the model has never seen.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

from lm.errors import LMError
from lm.fewshot import DEFAULT_TEMPLATE, Example, build_prompt

EPISODE_LINES = (4, 12)  # examples per training episode, inclusive
WORD_LENGTHS = (3, 7)
DIGIT_LENGTHS = (1, 4)
HELDOUT_MODULUS = 10  # one word (or digit string) in ten is kept for evaluation
TRAIN_SHIFTS = (1, 2, 4, 5)
HELDOUT_SHIFT = 3
EPISODE_SEPARATOR = "\n"  # the blank line between episodes; starts every evaluation prompt

VOWELS = "aeiou"
CONSONANTS = "bcdfghjklmnprstvz" * 3 + "qwxy"  # rare letters rarely
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# -- the tasks: small pure functions of one string ----------------------------------------


def reverse(word: str) -> str:
    return word[::-1]


def upper(word: str) -> str:
    return word.upper()


def capitalize(word: str) -> str:
    return word.capitalize()


def sort_letters(word: str) -> str:
    return "".join(sorted(word))


def shift(word: str, k: int) -> str:
    """Caesar shift of the letters a-z by `k` places, wrapping z to a."""
    return "".join(chr((ord(c) - 97 + k) % 26 + 97) if "a" <= c <= "z" else c for c in word)


def repeat(word: str) -> str:
    return f"{word} {word}"


def first_letter(word: str) -> str:
    return word[0]


def last_letter(word: str) -> str:
    return word[-1]


def swap_pairs(word: str) -> str:
    """Swap letters 1 and 2, 3 and 4, ...; an odd last letter stays."""
    chars = list(word)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def double_letters(word: str) -> str:
    return "".join(c + c for c in word)


def digits_to_words(digits: str) -> str:
    return " ".join(DIGIT_NAMES[int(d)] for d in digits)


def length(word: str) -> str:
    return str(len(word))


@dataclass(frozen=True)
class Task:
    name: str
    apply: Callable[[str], str]
    inputs: str = "word"  # "word" or "digits"


def _shift_task(k: int) -> Task:
    return Task(f"shift+{k}", partial(shift, k=k))


_FIXED_TASKS = (
    Task("reverse", reverse),
    Task("upper", upper),
    Task("capital", capitalize),
    Task("sort", sort_letters),
    Task("repeat", repeat),
    Task("first", first_letter),
    Task("last", last_letter),
    Task("swap", swap_pairs),
    Task("double", double_letters),
    Task("digits", digits_to_words, inputs="digits"),
    Task("length", length),
)
# Training draws a family, then one of its variants: shifting is one task among the others.
TRAIN_FAMILIES: tuple[tuple[Task, ...], ...] = (
    *((task,) for task in _FIXED_TASKS),
    tuple(_shift_task(k) for k in TRAIN_SHIFTS),
)
# Evaluation: one task per family, with the held-out parameter where the family has one.
EVAL_TASKS: tuple[Task, ...] = (*_FIXED_TASKS, _shift_task(HELDOUT_SHIFT))
# Tasks that never occur in training (a parameter not seen): scored apart as well.
UNSEEN_TASKS = frozenset({_shift_task(HELDOUT_SHIFT).name})


# -- words --------------------------------------------------------------------------------


def random_word(rng: random.Random) -> str:
    """A pronounceable lowercase word: consonants and vowels in turn."""
    size = rng.randint(*WORD_LENGTHS)
    consonant = rng.random() < 0.7
    letters = []
    for _ in range(size):
        letters.append(rng.choice(CONSONANTS if consonant else VOWELS))
        consonant = not consonant
    return "".join(letters)


def random_digits(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(*DIGIT_LENGTHS)))


def is_heldout(text: str) -> bool:
    """Whether a word (3+ letters) or digit string (2+ digits) is kept for evaluation.

    Decided by a hash of the text alone, so it holds for every seed and corpus size.
    """
    if text in DIGIT_NAMES:
        return False  # the vocabulary of the digits task's outputs
    if text.isdigit():
        eligible = len(text) >= 2
    else:
        eligible = len(text) >= WORD_LENGTHS[0] and text.isalpha()
    return eligible and zlib.crc32(b"lm-heldout:" + text.lower().encode()) % HELDOUT_MODULUS == 0


def _mentions_heldout(text: str) -> bool:
    return any(is_heldout(part) for part in text.lower().split())


def _draw_input(rng: random.Random, task: Task, heldout: bool) -> str:
    """A random input for `task`: a held-out one, or one whose input and output are not."""
    draw = random_digits if task.inputs == "digits" else random_word
    while True:
        text = draw(rng)
        if heldout:
            if is_heldout(text):
                return text
        elif not is_heldout(text) and not _mentions_heldout(task.apply(text)):
            return text


def _draw_examples(
    rng: random.Random, task: Task, count: int, heldout: bool, exclude: Iterable[str] = ()
) -> list[Example]:
    """`count` examples with distinct inputs, drawn one after another (so the first k of a
    longer draw from the same state are the k-example draw)."""
    seen = set(exclude)
    examples = []
    while len(examples) < count:
        text = _draw_input(rng, task, heldout)
        if text not in seen:
            seen.add(text)
            examples.append(Example(text, task.apply(text)))
    return examples


# -- corpus and evaluation episodes -------------------------------------------------------


def format_episode(examples: list[Example]) -> str:
    return "".join(DEFAULT_TEMPLATE.format(input=ex.input, output=ex.output) for ex in examples)


def make_corpus(n_episodes: int, seed: int = 0) -> str:
    """Training text: `n_episodes` episodes of one random task each, blank-line separated."""
    if n_episodes < 1:
        raise LMError(f"the number of episodes must be at least 1, got {n_episodes}")
    rng = random.Random(seed)
    episodes = []
    for _ in range(n_episodes):
        task = rng.choice(rng.choice(TRAIN_FAMILIES))
        count = rng.randint(*EPISODE_LINES)
        episodes.append(format_episode(_draw_examples(rng, task, count, heldout=False)))
    return EPISODE_SEPARATOR.join(episodes)


def write_corpus(path: str | Path, n_episodes: int, seed: int = 0) -> str:
    """Write `make_corpus` to `path` (UTF-8, parent folders created); return the text."""
    text = make_corpus(n_episodes, seed)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise LMError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    return text


class Episode(NamedTuple):
    task: str
    examples: list[Example]
    query: str
    answer: str


def heldout_episodes(n: int, seed: int = 0, shots: int = 4) -> Iterator[Episode]:
    """`n` evaluation episodes over held-out words only (and the held-out shift).

    Tasks take turns in a seeded order, so every task is equally represented. Episode i is
    the same query for every `shots`, and its examples for k shots are the first k of its
    examples for more shots: accuracies at different shot counts compare like with like.
    """
    if n < 1:
        raise LMError(f"the number of episodes must be at least 1, got {n}")
    if shots < 0:
        raise LMError(f"shots must be >= 0, got {shots}")
    order = list(EVAL_TASKS)
    random.Random(f"tasks:{seed}").shuffle(order)
    for i in range(n):
        task = order[i % len(order)]
        rng = random.Random(f"heldout:{seed}:{i}")
        query = _draw_input(rng, task, heldout=True)
        examples = _draw_examples(rng, task, shots, heldout=True, exclude=[query])
        yield Episode(task.name, examples, query, task.apply(query))


def episode_prompt(examples: list[Example], query: str) -> tuple[str, list[str]]:
    """The evaluation prompt: a blank line (an episode starts after one in training), the
    examples and the query in the training format; and the stop sequence (the line end)."""
    prompt, stop = build_prompt(examples, query, DEFAULT_TEMPLATE)
    return EPISODE_SEPARATOR + prompt, stop


def fewshot_accuracy(
    checkpoint, shots_list: Iterable[int], episodes: int = 200, seed: int = 0, max_batch: int = 64
) -> dict[int, dict]:
    """Exact-match accuracy of greedy completions on held-out episodes, per shot count:
    {shots: {"overall": ..., "seen_tasks": ..., "unseen_tasks": ..., "per_task": {task: ...}}}.

    Every episode uses held-out words. "seen_tasks" scores the tasks trained on (new words
    only), "unseen_tasks" those whose parameter never occurs in training (shift+3), and
    "overall" all of them.

    `checkpoint` is a loaded lm.checkpoint.Checkpoint, a shipped name or a directory. All
    prompts (every shot count) go to the engine at once, batched `max_batch` at a time.
    """
    from lm.checkpoint import Checkpoint, load_checkpoint
    from lm.generate import Generator
    from lm.sampling import SamplingParams

    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint)
    shots_list = sorted(set(shots_list))
    if not shots_list:
        raise LMError("give at least one number of shots")
    prompts, keys, answers, stop = [], [], [], []
    for shots in shots_list:
        for episode in heldout_episodes(episodes, seed, shots):
            prompt, stop = episode_prompt(episode.examples, episode.query)
            prompts.append(prompt)
            keys.append((shots, episode.task))
            answers.append(episode.answer)
    # Room for the longest answer and the line end: a longer completion is wrong anyway.
    params = SamplingParams(
        max_new_tokens=max(len(a) for a in answers) + 2, temperature=0.0, seed=seed, stop=stop
    )
    completions = Generator(checkpoint, max_batch=max_batch).complete(prompts, params)
    tally: dict[int, dict[str, list[int]]] = {shots: {} for shots in shots_list}
    for (shots, task), answer, completion in zip(keys, answers, completions):
        correct = completion.finish_reason == "stop" and completion.text == answer
        tally[shots].setdefault(task, []).append(int(correct))
    order = [task.name for task in EVAL_TASKS]
    result = {}
    for shots, per_task in tally.items():
        scores = [s for task_scores in per_task.values() for s in task_scores]
        seen = [s for name, task_scores in per_task.items() if name not in UNSEEN_TASKS
                for s in task_scores]
        unseen = [s for name, task_scores in per_task.items() if name in UNSEEN_TASKS
                  for s in task_scores]
        result[shots] = {
            "overall": sum(scores) / len(scores),
            "seen_tasks": sum(seen) / len(seen) if seen else None,
            "unseen_tasks": sum(unseen) / len(unseen) if unseen else None,
            "per_task": {
                name: sum(per_task[name]) / len(per_task[name])
                for name in order
                if name in per_task
            },
        }
    return result


def accuracy_table(result: dict[int, dict]) -> str:
    """`fewshot_accuracy`'s result as text: a row per shot count, overall then each task."""
    tasks = list(next(iter(result.values()))["per_task"])
    columns = ["overall", "seen", "unseen", *tasks]
    width = max(8, *(len(c) + 1 for c in columns))
    lines = ["shots" + "".join(f"{c:>{width}}" for c in columns)]
    for shots, row in result.items():
        values = [row["overall"], row.get("seen_tasks"), row.get("unseen_tasks"),
                  *(row["per_task"].get(t) for t in tasks)]
        lines.append(f"{shots:>5}" + "".join(
            f"{'-':>{width}}" if v is None else f"{100 * v:>{width - 1}.1f}%" for v in values))
    return "\n".join(lines)


def plot_accuracy(results: dict[str, dict[int, dict]], path: str | Path) -> None:
    """Save `accuracy vs shots` to an image file: per checkpoint, a solid line for the tasks
    seen in training (held-out words) and a dashed one for all tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    all_shots: set[int] = set()
    for name, result in results.items():
        shots = sorted(result)
        all_shots.update(shots)
        seen = [result[s].get("seen_tasks") for s in shots]
        if None in seen:  # only the tasks never trained on were drawn
            seen = [result[s]["overall"] for s in shots]
        (line,) = ax.plot(shots, [100 * v for v in seen], "o-", label=f"{name}, trained tasks")
        ax.plot(shots, [100 * result[s]["overall"] for s in shots], "o--", alpha=0.5,
                color=line.get_color(), label=f"{name}, all (with held-out shift+3)")
    ax.set_xticks(sorted(all_shots))
    ax.set_xlabel("examples in the prompt (shots)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(-2, 102)  # lines at 0% or 100% stay visible
    ax.set_title("few-shot accuracy vs shots (held-out words)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as exc:
        raise LMError(f"--plot {path}: cannot save ({exc})") from exc
    finally:
        plt.close(fig)
