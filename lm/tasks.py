"""In-context learning: a corpus of few-shot episodes to train on, and held-out episodes that
measure whether a model infers a task from its examples alone, on what users type.

An episode is a handful of `input => output` lines (lm.fewshot's default template) for one
string task; episodes are separated by a blank line. Inputs are real English words
(lm/wordlists, built once by lm/wordlists/build.py), random letter strings and letter-digit
strings of 1 to 12 characters, in lower, Capitalized, UPPER or mIxEd case. Tasks are
primitives (reverse, shift by k, first n, ...), their parameters and two-step compositions
(reverse then upper, ...): half the episodes draw a primitive, half a composition from a
Zipfian mix over ~1,600 of them (v4: a pair of primitive families, uniformly, then the
parameters; v5: the pairs weighted by the square root of their sizes; v6: then each
parameter by Zipf rank), so many tasks occur few times each.

Kept out of training, for evaluation: one input in ten (by a hash of the lowercased text, so
whole words and strings), inputs longer than 12, and the task variants in UNSEEN_TASKS
(shift by 3, rotate by 3, three compositions).

Corpus versions (`make_corpus(version=...)`, `lm make-tasks --version`): 2 writes every
episode in the default template and draws letters and digits only (the corpus the shipped
few-shot models of issue 13 trained on); 3 writes each episode in a template drawn from
TRAIN_TEMPLATES (`->`, `:`, `=`, tab, `Q: ... A: ...`, two-line `Input:`/`Output:`, ...)
and adds inputs with punctuation, so the vocabulary is all of printable ASCII and a model
follows the format a user writes. HELDOUT_TEMPLATES are never trained on. 4 is 3 with the
compositions drawn by family pair: v3's Zipfian mix over the flat list gives one composition
(novowels|capitalize) 12.5% of the compositions' episodes and reverse|double 0.009%, and
puts 45% on pairs of shift, rotate and slice families; v4 gives each of the 141 family
pairs 0.7%, so every primitive is seen composed with every family it composes with. 5 is 4
with each family pair weighted by the square root of its number of tasks: v4 starves the
pairs with many parameters (shift by k then reverse, 24 tasks, gets 0.35% of the episodes,
and a model trained on it composes no shift with any reordering), v5 gives shift and reorder
pairs 17% of the compositions (v3 28%, v4 7%) and the smallest pair 0.28% (v3's
reverse then double 0.009%). 6 is 5 with each step's parameter drawn by Zipf rank instead of
uniformly (shift by 1, then 2, 4, ...; first 1, then 2, ...): v5 spreads shift-then-reverse
over 24 shifts, so shift by 1 then reverse got 0.06% of the compositions (v6: 0.34%), and
a model trained on v5 composes no shift with a reordering, not even that one. Trained on v6
the same model does that one, but answers shift by 3 with a shift it saw more often. 7 is
6 with each primitive's family drawn by the square root of its number of tasks, as the
pairs are: shift by k, 24 values drawn evenly, goes from 1 in 17 of the primitives to 1 in
5, so reading k off the examples is practised over every value; trained on it, the same
model still misses shift by 3 (docs/BENCHMARKS.md, session 22).
"""

from __future__ import annotations

import itertools
import random
import re
import string
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import NamedTuple

from lm.errors import LMError
from lm.fewshot import DEFAULT_TEMPLATE, Example, build_prompt, split_template

EPISODE_LINES = (4, 12)  # examples per training episode, inclusive
MAX_TRAIN_LENGTH = 12  # inputs of training are 1 to 12 characters
MAX_WORD_LENGTH = 16  # the "long" evaluation: 13 to 16, never in training
LONG_LENGTHS = (MAX_TRAIN_LENGTH + 1, MAX_WORD_LENGTH)
EVAL_LENGTHS = (3, MAX_TRAIN_LENGTH)  # shorter inputs cannot be held out (too few exist)
DIGIT_LENGTHS = (1, 6)
HELDOUT_MODULUS = 10  # one input in ten is kept for evaluation
EPISODE_SEPARATOR = "\n"  # the blank line between episodes; starts every evaluation prompt
WORDLISTS = Path(__file__).resolve().parent / "wordlists"

VOWELS = "aeiouAEIOU"
ALPHABET = string.ascii_letters + string.digits + " =>-\n"  # every character of a v2 corpus
# Every character of a v3 corpus: printable ASCII without the rare vertical whitespace.
ALPHABET_V3 = "".join(sorted(set(string.printable) - set("\r\x0b\x0c")))
CORPUS_VERSIONS = (2, 3, 4, 5, 6, 7)
LATEST_VERSION = 5  # the default: the shipped few-shot GPT's corpus (6: docs/BENCHMARKS.md)
# v3: each episode's format, and how often. The default stays the most common (the format
# of `lm generate --example` and the API's examples without a template).
TRAIN_TEMPLATES = (
    (DEFAULT_TEMPLATE, 0.30),
    ("{input} -> {output}\n", 0.10),
    ("{input}: {output}\n", 0.10),
    ("{input} = {output}\n", 0.07),
    ("{input} | {output}\n", 0.05),
    ("{input}\t{output}\n", 0.05),
    ("{input}, {output}\n", 0.05),
    ("Q: {input} A: {output}\n", 0.08),
    ("in: {input} out: {output}\n", 0.05),
    ("Input: {input}\nOutput: {output}\n", 0.15),
)
HELDOUT_TEMPLATES = ("{input} ~> {output}\n", "Q: {input}\nA: {output}\n")  # never trained
SYMBOLS = "".join(sorted(set(string.punctuation)))
SYMBOL_SHARE = 0.2  # of the characters of a v3 "symbols" input
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CASE_STYLES = (("lower", 0.55), ("capital", 0.15), ("upper", 0.12), ("mixed", 0.18))
COMPOSITION_SHARE = 0.5  # of training episodes; the rest draw a primitive
ZIPF_EXPONENT = 1.0


# -- the primitives: small pure functions of one string ------------------------------------


def reverse(word: str) -> str:
    return word[::-1]


def upper(word: str) -> str:
    return word.upper()


def lower(word: str) -> str:
    return word.lower()


def swapcase(word: str) -> str:
    return word.swapcase()


def capitalize(word: str) -> str:
    return word.capitalize()


def sort_letters(word: str) -> str:
    return "".join(sorted(word))


def shift(word: str, k: int) -> str:
    """Caesar shift of the letters by `k` places, wrapping z to a; case and digits stay."""
    out = []
    for c in word:
        base = 97 if "a" <= c <= "z" else 65 if "A" <= c <= "Z" else None
        out.append(c if base is None else chr((ord(c) - base + k) % 26 + base))
    return "".join(out)


def rotate(word: str, k: int) -> str:
    """Move the first `k` characters (modulo the length) to the end."""
    k %= max(len(word), 1)
    return word[k:] + word[:k]


def first(word: str, n: int) -> str:
    return word[:n]


def last(word: str, n: int) -> str:
    return word[-n:]


def drop_vowels(word: str) -> str:
    return "".join(c for c in word if c not in VOWELS)


def double_letters(word: str) -> str:
    return "".join(c + c for c in word)


def repeat(word: str) -> str:
    return f"{word} {word}"


def dashes(word: str) -> str:
    return "-".join(word)


def swap_pairs(word: str) -> str:
    """Swap characters 1 and 2, 3 and 4, ...; an odd last one stays."""
    chars = list(word)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def digits_to_words(digits: str) -> str:
    return " ".join(DIGIT_NAMES[int(d)] for d in digits)


def length(word: str) -> str:
    return str(len(word))


def _compose(functions: tuple[Callable[[str], str], ...], word: str) -> str:
    for function in functions:
        word = function(word)
    return word


@dataclass(frozen=True)
class Task:
    """A string task: `apply` maps an input to its output. `kind` says how it composes:
    two steps of one kind never compose; "grow" steps come last; "end" steps never compose."""

    name: str
    apply: Callable[[str], str]
    kind: str = "order"
    inputs: str = "text"  # "text" (words, letter or letter-digit strings) or "digits"

    def then(self, other: Task) -> Task:
        """This task, then `other`: named `a|b`."""
        steps = (self.apply, other.apply)
        return Task(f"{self.name}|{other.name}", partial(_compose, steps), "composed")


TRAIN_SHIFTS = tuple(k for k in range(1, 26) if k != 3)
TRAIN_ROTATIONS = (1, 2, 4, 5, 6)
SLICE_SIZES = (1, 2, 3, 4, 5)


def _shift(k: int) -> Task:
    return Task(f"shift{k}", partial(shift, k=k), "shift")


def _rotate(k: int) -> Task:
    return Task(f"rotate{k}", partial(rotate, k=k), "rotate")


def _first(n: int) -> Task:
    return Task(f"first{n}", partial(first, n=n), "slice")


def _last(n: int) -> Task:
    return Task(f"last{n}", partial(last, n=n), "slice")


PRIMITIVE_FAMILIES: tuple[tuple[Task, ...], ...] = (
    (Task("reverse", reverse),),
    (Task("upper", upper, "case"),),
    (Task("lower", lower, "case"),),
    (Task("swapcase", swapcase, "case"),),
    (Task("capitalize", capitalize, "case"),),
    (Task("sort", sort_letters),),
    (Task("swap", swap_pairs),),
    tuple(_shift(k) for k in TRAIN_SHIFTS),
    tuple(_rotate(k) for k in TRAIN_ROTATIONS),
    tuple(_first(n) for n in SLICE_SIZES),
    tuple(_last(n) for n in SLICE_SIZES),
    (Task("novowels", drop_vowels, "filter"),),
    (Task("double", double_letters, "grow"),),
    (Task("repeat", repeat, "grow"),),
    (Task("dashes", dashes, "grow"),),
    (Task("length", length, "end"),),
    (Task("digits", digits_to_words, "end", inputs="digits"),),
)
PRIMITIVES = {task.name: task for family in PRIMITIVE_FAMILIES for task in family}
# Compositions never trained on, in both orders; swapcase counts as upper (on lowercase
# input they agree, so "reverse|swapcase" episodes would teach "reverse|upper").
HELDOUT_PAIRS = (
    frozenset({"reverse", "upper"}),
    frozenset({"sort", "double"}),
    frozenset({"reverse", "novowels"}),
)
_ALIASES = {"swapcase": "upper"}


def _composable(a: Task, b: Task) -> bool:
    if "end" in (a.kind, b.kind) or a.kind == "grow" or a.kind == b.kind:
        return False
    if a.kind == "order" and b.kind == "order":  # reverse|sort is sort: keep tasks distinct
        return False
    pair = frozenset({_ALIASES.get(a.name, a.name), _ALIASES.get(b.name, b.name)})
    return pair not in HELDOUT_PAIRS


@cache
def train_compositions() -> tuple[Task, ...]:
    """Every two-step composition trained on, in a fixed Zipf rank order."""
    tasks = [
        a.then(b) for a, b in itertools.permutations(PRIMITIVES.values(), 2) if _composable(a, b)
    ]
    random.Random("lm-compositions").shuffle(tasks)
    return tuple(tasks)


@cache
def _zipf_weights(n: int) -> list[float]:
    return list(itertools.accumulate(1 / (rank + 1) ** ZIPF_EXPONENT for rank in range(n)))


@cache
def family_pairs() -> tuple[tuple[tuple[Task, ...], tuple[Task, ...]], ...]:
    """The ordered pairs of primitive families whose tasks compose, in a fixed order. Every
    task of the first family composes with every task of the second (held-out pairs and
    kinds that do not compose are whole families)."""
    return tuple(
        (before, after)
        for before, after in itertools.permutations(PRIMITIVE_FAMILIES, 2)
        if _composable(before[0], after[0])
    )


@cache
def family_pair_compositions() -> tuple[tuple[Task, ...], ...]:
    """The compositions trained on, grouped by their pair of primitive families (in
    family_pairs' order): shift then rotate holds 24 x 5 tasks."""
    return tuple(
        tuple(a.then(b) for a, b in itertools.product(before, after))
        for before, after in family_pairs()
    )


@cache
def _family_pair_weights() -> list[float]:
    """Cumulative weights of the family pairs from version 5 on: the square root of each
    pair's number of tasks (1 to 120), between v4's equal pairs and an equal share per task."""
    sizes = [len(group) for group in family_pair_compositions()]
    return list(itertools.accumulate(size**0.5 for size in sizes))


@cache
def _primitive_family_weights() -> list[float]:
    """Cumulative weights of the primitive families from version 7 on: the square root of
    each family's number of tasks, as the pairs (shift by k: sqrt(24) ~ 4.9 a single task's)."""
    return list(itertools.accumulate(len(family) ** 0.5 for family in PRIMITIVE_FAMILIES))


def _zipf_choice(rng: random.Random, family: tuple[Task, ...]) -> Task:
    """A task of `family` by Zipf rank in its order (shift by 1 first, then 2, 4, ...)."""
    return rng.choices(family, cum_weights=_zipf_weights(len(family)))[0]


def draw_train_task(rng: random.Random, version: int) -> Task:
    """Half primitives (a family, then a parameter), half compositions: by Zipf rank over
    all of them (version 2 and 3), or a pair of families, then parameters: the pairs
    uniformly (4) or by the square root of their sizes (5 on); version 6 on then draws each
    step's parameter by Zipf rank instead of uniformly. A primitive's family is drawn
    uniformly, or from version 7 on by the square root of its size, then its parameter
    uniformly."""
    if rng.random() < COMPOSITION_SHARE:
        if version >= 6:
            pair = rng.choices(family_pairs(), cum_weights=_family_pair_weights())[0]
            return _zipf_choice(rng, pair[0]).then(_zipf_choice(rng, pair[1]))
        if version == 5:
            groups = family_pair_compositions()
            return rng.choice(rng.choices(groups, cum_weights=_family_pair_weights())[0])
        if version == 4:
            return rng.choice(rng.choice(family_pair_compositions()))
        compositions = train_compositions()
        return rng.choices(compositions, cum_weights=_zipf_weights(len(compositions)))[0]
    if version >= 7:
        family = rng.choices(PRIMITIVE_FAMILIES, cum_weights=_primitive_family_weights())[0]
        return rng.choice(family)
    return rng.choice(rng.choice(PRIMITIVE_FAMILIES))


# Evaluation. Seen: primitives and compositions that training draws. Unseen: variants
# never trained on (a parameter value, or a pair of primitives composed in either order).
SEEN_TASKS: tuple[Task, ...] = (
    *(
        PRIMITIVES[name]
        for name in (
            "reverse",
            "upper",
            "lower",
            "swapcase",
            "capitalize",
            "sort",
            "swap",
            "shift1",
            "shift13",
            "rotate1",
            "first2",
            "last3",
            "novowels",
            "double",
            "repeat",
            "dashes",
            "length",
        )
    ),
    PRIMITIVES["reverse"].then(PRIMITIVES["capitalize"]),
    PRIMITIVES["first3"].then(PRIMITIVES["upper"]),
    PRIMITIVES["shift1"].then(PRIMITIVES["reverse"]),
)
UNSEEN_TASKS: tuple[Task, ...] = (
    _shift(3),
    _rotate(3),
    PRIMITIVES["reverse"].then(PRIMITIVES["upper"]),
    PRIMITIVES["sort"].then(PRIMITIVES["double"]),
    PRIMITIVES["novowels"].then(PRIMITIVES["reverse"]),
)
CATEGORIES = {
    "words": "seen tasks, held-out real words",
    "random": "seen tasks, random strings",
    "long": f"seen tasks, {LONG_LENGTHS[0]}-{LONG_LENGTHS[1]} characters (longer than training)",
    "unseen": "task variants never trained on, held-out words",
}


# Task families with a number in their name (shift3, first7): the number makes the task.
PARAMETERISED = {"shift": _shift, "rotate": _rotate, "first": _first, "last": _last}


def task_named(name: str) -> Task:
    """The task a name says: a primitive (`reverse`, `shift3`, `first7`: any parameter from 1,
    trained on or not) or steps joined by `|`, applied left to right (`shift1|reverse`)."""
    steps = []
    for step in (part.strip() for part in name.split("|")):
        match = re.fullmatch(r"([a-z]+?)([1-9]\d*)", step)
        if match and match[1] in PARAMETERISED:
            steps.append(PARAMETERISED[match[1]](int(match[2])))
        elif step in PRIMITIVES and PRIMITIVES[step].inputs == "text":
            steps.append(PRIMITIVES[step])
        else:
            singles = [n for n, t in PRIMITIVES.items() if t.inputs == "text" and n.isalpha()]
            raise LMError(
                f"unknown task {step!r} in {name!r}; a task is one of {', '.join(singles)}, "
                f"{', '.join(f'{family}N' for family in PARAMETERISED)} (N from 1), "
                "or such steps joined by |"
            )
    task = steps[0]
    for step in steps[1:]:
        task = task.then(step)
    return task


# -- inputs --------------------------------------------------------------------------------


def is_heldout(text: str) -> bool:
    """Whether an input (3+ letters or digits, any case) is kept for evaluation.

    Decided by a hash of the lowercased text alone, so it holds for every seed, corpus size
    and case style, and for words and random strings alike.
    """
    text = text.lower()
    if text in DIGIT_NAMES:
        return False  # the vocabulary of the digits task's outputs
    eligible = len(text) >= 3 and text.isascii() and text.isalnum()
    return eligible and zlib.crc32(b"lm-heldout:" + text.encode()) % HELDOUT_MODULUS == 0


def _mentions_heldout(text: str) -> bool:
    return any(is_heldout(part) for part in text.split())


@cache
def word_list(name: str) -> dict[int, tuple[str, ...]]:
    """The committed word list `name` ("train" or "heldout"), by length."""
    path = WORDLISTS / f"{name}.txt"
    try:
        words = path.read_text(encoding="utf-8").split()
    except OSError as exc:
        raise LMError(
            f"{path}: cannot read the word list ({exc.strerror or exc}); "
            "rebuild it with `python lm/wordlists/build.py`"
        ) from exc
    by_length: dict[int, list[str]] = {}
    for word in words:
        by_length.setdefault(len(word), []).append(word)
    return {size: tuple(items) for size, items in sorted(by_length.items())}


def random_word(rng: random.Random, name: str, lengths: tuple[int, int]) -> str:
    """A word of the list within `lengths`: half the time of a uniformly drawn length (so
    short words, rare in a dictionary, come up too), else uniform over the words."""
    by_length = word_list(name)
    sizes = [size for size in by_length if lengths[0] <= size <= lengths[1]]
    if rng.random() < 0.5:
        size = rng.choice(sizes)
    else:
        size = rng.choices(sizes, weights=[len(by_length[s]) for s in sizes])[0]
    return rng.choice(by_length[size])


def random_string(
    rng: random.Random, lengths: tuple[int, int], digits: bool = False, symbols: bool = False
) -> str:
    """Random lowercase letters (a quarter of them digits when `digits`; a fifth of them
    punctuation when `symbols`)."""
    size = rng.randint(*lengths)
    if symbols:
        return "".join(
            rng.choice(SYMBOLS)
            if rng.random() < SYMBOL_SHARE
            else rng.choice(string.ascii_lowercase)
            for _ in range(size)
        )
    return "".join(
        rng.choice(string.digits)
        if digits and rng.random() < 0.25
        else rng.choice(string.ascii_lowercase)
        for _ in range(size)
    )


def random_digits(rng: random.Random) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(*DIGIT_LENGTHS)))


def styled(text: str, style: str, rng: random.Random) -> str:
    """`text` in a case style: lower, capital, upper, or mixed (each letter at random)."""
    if style == "capital":
        return text.capitalize()
    if style == "upper":
        return text.upper()
    if style == "mixed":
        return "".join(c.upper() if rng.random() < 0.5 else c for c in text)
    return text


def _draw_style(rng: random.Random) -> str:
    names, weights = zip(*CASE_STYLES)
    return rng.choices(names, weights)[0]


Source = Callable[[random.Random], str]


INPUT_KINDS = {  # corpus version: (kinds of training input, their weights)
    2: (("word", "letters", "alnum"), (0.55, 0.3, 0.15)),
    3: (("word", "letters", "alnum", "symbols"), (0.5, 0.25, 0.13, 0.12)),
}
for _version in (4, 5, 6, 7):
    INPUT_KINDS[_version] = INPUT_KINDS[3]


def _train_source(rng: random.Random, task: Task, version: int = 2) -> Source:
    """How one training episode draws its inputs: a kind of string and a case style."""
    if task.inputs == "digits":
        return random_digits
    style = _draw_style(rng)
    lengths = (1, MAX_TRAIN_LENGTH)
    kind = rng.choices(*INPUT_KINDS[version])[0]
    if kind == "word":
        return lambda r: styled(random_word(r, "train", lengths), style, r)
    digits, symbols = kind == "alnum", kind == "symbols"
    return lambda r: styled(random_string(r, lengths, digits, symbols), style, r)


def _eval_source(rng: random.Random, category: str) -> Source:
    """How an evaluation episode of `category` draws its inputs (all held out)."""
    if category == "unseen":
        return lambda r: random_word(r, "heldout", (4, MAX_TRAIN_LENGTH))
    style = _draw_style(rng)
    if category == "words":
        return lambda r: styled(random_word(r, "heldout", EVAL_LENGTHS), style, r)
    if category == "random":
        digits = rng.random() < 0.3
        return lambda r: styled(random_string(r, EVAL_LENGTHS, digits), style, r)
    if category == "long":
        if rng.random() < 0.5:
            return lambda r: styled(random_word(r, "heldout", LONG_LENGTHS), style, r)
        return lambda r: styled(random_string(r, LONG_LENGTHS), style, r)
    raise LMError(
        f"unknown evaluation category {category!r}; expected one of {', '.join(CATEGORIES)}"
    )


def _valid(output: str) -> bool:
    return bool(output) and "\n" not in output and "=>" not in output


def _fits(template: str) -> Callable[[str, str], bool]:
    """Whether an example's input and output can be written in `template`: a non-empty
    output, neither holding a line break nor the template's separators (as
    lm.fewshot.build_prompt requires)."""
    head, middle, tail = split_template(template)
    separators = [part for part in (head.strip(), middle.strip(), tail.strip()) if part]

    def fits(text: str, output: str) -> bool:
        if not output or "\n" in text + output or "\t" in text + output:
            return False
        return not any(sep in text or sep in output for sep in separators)

    return fits


def _draw_examples(
    rng: random.Random,
    task: Task,
    source: Source,
    count: int,
    heldout: bool,
    exclude: Iterable[str] = (),
    fits: Callable[[str, str], bool] | None = None,
) -> list[Example]:
    """`count` examples with distinct inputs, drawn one after another (so the first k of a
    longer draw from the same state are the k-example draw). `fits`: which examples the
    episode's template can hold (None: the v2 rule, no line break and no `=>` in outputs)."""
    seen = set(exclude)
    examples = []
    while len(examples) < count:
        text = source(rng)
        output = task.apply(text)
        if text in seen or not (_valid(output) if fits is None else fits(text, output)):
            continue
        if heldout != is_heldout(text) or (not heldout and _mentions_heldout(output)):
            continue
        seen.add(text)
        examples.append(Example(text, output))
    return examples


# -- corpus and evaluation episodes -------------------------------------------------------


def format_episode(examples: list[Example], template: str = DEFAULT_TEMPLATE) -> str:
    return "".join(template.format(input=ex.input, output=ex.output) for ex in examples)


def answer_mask(examples: list[Example], template: str = DEFAULT_TEMPLATE) -> bytes:
    """One byte per character of `format_episode(examples, template)`: 1 on each output and
    the template's text after it (the line end that closes an answer), 0 on the rest. As
    `lm train --loss-mask` it puts the loss on the answers only."""
    head, middle, tail = split_template(template)
    return b"".join(
        bytes(len(head) + len(ex.input) + len(middle)) + b"\1" * (len(ex.output) + len(tail))
        for ex in examples
    )


def _corpus_episodes(
    n_episodes: int, seed: int, version: int
) -> Iterator[tuple[list[Example], str]]:
    """The examples and template of each training episode of corpus `version`."""
    if n_episodes < 1:
        raise LMError(f"the number of episodes must be at least 1, got {n_episodes}")
    if version not in CORPUS_VERSIONS:
        raise LMError(
            f"unknown corpus version {version}; expected one of "
            f"{', '.join(map(str, CORPUS_VERSIONS))}"
        )
    rng = random.Random(seed)
    names, weights = zip(*TRAIN_TEMPLATES)
    for _ in range(n_episodes):
        template = rng.choices(names, weights)[0] if version >= 3 else DEFAULT_TEMPLATE
        fits = _fits(template) if version >= 3 else None
        task = draw_train_task(rng, version)
        source = _train_source(rng, task, version)
        count = rng.randint(*EPISODE_LINES)
        yield _draw_examples(rng, task, source, count, heldout=False, fits=fits), template


def make_corpus(n_episodes: int, seed: int = 0, version: int = LATEST_VERSION) -> str:
    """Training text: `n_episodes` episodes of one random task each, blank-line separated,
    in the format of corpus `version` (see the module docstring)."""
    return make_corpus_and_mask(n_episodes, seed, version)[0]


def make_corpus_and_mask(
    n_episodes: int, seed: int = 0, version: int = LATEST_VERSION
) -> tuple[str, bytes]:
    """`make_corpus` and its `answer_mask`, one byte per character (0 on the blank lines)."""
    texts, masks = [], []
    for examples, template in _corpus_episodes(n_episodes, seed, version):
        texts.append(format_episode(examples, template))
        masks.append(answer_mask(examples, template))
    text = EPISODE_SEPARATOR.join(texts)
    mask = bytes(len(EPISODE_SEPARATOR)).join(masks)
    assert len(mask) == len(text), "a template's text must format as written"
    return text, mask


def write_corpus(
    path: str | Path,
    n_episodes: int,
    seed: int = 0,
    version: int = LATEST_VERSION,
    mask_path: str | Path | None = None,
) -> str:
    """Write `make_corpus` to `path` (UTF-8, parent folders created), and its answer mask
    to `mask_path` if given; return the text."""
    text, mask = make_corpus_and_mask(n_episodes, seed, version)
    for target, data in ((path, text.encode("utf-8")), (mask_path, mask)):
        if target is None:
            continue
        target = Path(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except OSError as exc:
            raise LMError(f"{target}: cannot write ({exc.strerror or exc})") from exc
    return text


class Episode(NamedTuple):
    task: str
    examples: list[Example]
    query: str
    answer: str


def eval_tasks(category: str) -> tuple[Task, ...]:
    """The tasks an evaluation category draws ("length" is left out of "long": its answers
    13-16 are numbers no training output holds)."""
    if category == "unseen":
        return UNSEEN_TASKS
    if category == "long":
        return tuple(task for task in SEEN_TASKS if task.name != "length")
    return SEEN_TASKS


def eval_episodes(
    category: str, n: int, seed: int = 0, shots: int = 4, tasks: Iterable[Task] | None = None
) -> Iterator[Episode]:
    """`n` evaluation episodes of `category` (see CATEGORIES), over held-out inputs only:
    its tasks (eval_tasks), or `tasks` on the category's inputs.

    Tasks take turns in a seeded order, so every task is equally represented. Episode i is
    the same query for every `shots`, and its examples for k shots are the first k of its
    examples for more shots: accuracies at different shot counts compare like with like.
    """
    if category not in CATEGORIES:
        raise LMError(
            f"unknown evaluation category {category!r}; expected one of {', '.join(CATEGORIES)}"
        )
    if n < 1:
        raise LMError(f"the number of episodes must be at least 1, got {n}")
    if shots < 0:
        raise LMError(f"shots must be >= 0, got {shots}")
    order = list(eval_tasks(category) if tasks is None else tasks)
    if not order:
        raise LMError("give at least one task")
    random.Random(f"tasks:{category}:{seed}").shuffle(order)
    for i in range(n):
        task = order[i % len(order)]
        rng = random.Random(f"heldout:{category}:{seed}:{i}")
        source = _eval_source(rng, category)
        (query,) = _draw_examples(rng, task, source, 1, heldout=True)
        examples = _draw_examples(rng, task, source, shots, heldout=True, exclude=[query.input])
        yield Episode(task.name, examples, query.input, query.output)


def episode_prompt(
    examples: list[Example], query: str, template: str = DEFAULT_TEMPLATE
) -> tuple[str, list[str]]:
    """The evaluation prompt: a blank line (an episode starts after one in training), the
    examples and the query in `template` (by default the training format); and the stop
    sequence (the template's end)."""
    prompt, stop = build_prompt(examples, query, template)
    return EPISODE_SEPARATOR + prompt, stop


def _mean(scores: list[int]) -> float | None:
    return sum(scores) / len(scores) if scores else None


def fewshot_accuracy(
    checkpoint,
    shots_list: Iterable[int],
    episodes: int = 200,
    seed: int = 0,
    max_batch: int = 64,
    template: str = DEFAULT_TEMPLATE,
    tasks: Iterable[Task] | None = None,
) -> dict[int, dict]:
    """Exact-match accuracy of greedy completions on held-out episodes, per shot count:
    {shots: {"words", "random", "long", "unseen", "overall", "per_task": {category: {task}}}}.

    `episodes` per category (CATEGORIES says what each measures); "overall" pools them all.
    The prompts follow `template` (a user's own format, to see whether the model follows
    it; the training corpus uses the default). `tasks` (task_named's): score these on
    held-out words, random strings and longer inputs instead; "unseen" is then None.
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
    tasks = None if tasks is None else tuple(tasks)
    categories = [c for c in CATEGORIES if tasks is None or c != "unseen"]

    def scored(category: str) -> tuple[Task, ...]:
        return eval_tasks(category) if tasks is None else tasks

    prompts, keys, answers, stop = [], [], [], []
    for shots in shots_list:
        for category in categories:
            for episode in eval_episodes(category, episodes, seed, shots, scored(category)):
                prompt, stop = episode_prompt(episode.examples, episode.query, template)
                prompts.append(prompt)
                keys.append((shots, category, episode.task))
                answers.append(episode.answer)
    # Room for the longest answer and the line end: a longer completion is wrong anyway.
    params = SamplingParams(
        max_new_tokens=max(len(a) for a in answers) + 2, temperature=0.0, seed=seed, stop=stop
    )
    completions = Generator(checkpoint, max_batch=max_batch).complete(prompts, params)
    tally: dict[int, dict[str, dict[str, list[int]]]] = {
        shots: {category: {} for category in CATEGORIES} for shots in shots_list
    }
    for (shots, category, task), answer, completion in zip(keys, answers, completions):
        correct = completion.finish_reason == "stop" and completion.text == answer
        tally[shots][category].setdefault(task, []).append(int(correct))
    result = {}
    for shots, per_category in tally.items():
        row: dict = {}
        for category in CATEGORIES:
            per_task = per_category[category]
            row[category] = _mean([s for scores in per_task.values() for s in scores])
        row["overall"] = _mean(
            [
                s
                for per_task in per_category.values()
                for scores in per_task.values()
                for s in scores
            ]
        )
        row["per_task"] = {
            category: {
                task.name: _mean(per_task[task.name])
                for task in scored(category)
                if task.name in per_task
            }
            for category, per_task in per_category.items()
        }
        result[shots] = row
    return result


def _percent(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{100 * value:>{width - 1}.1f}%"


def accuracy_table(result: dict[int, dict]) -> str:
    """`fewshot_accuracy`'s result as text: a row per shot count and a column per category;
    then, at the largest shot count, a row per task."""
    columns = [*CATEGORIES, "overall"]
    lines = ["shots" + "".join(f"{c:>9}" for c in columns)]
    for shots, row in result.items():
        lines.append(f"{shots:>5}" + "".join(_percent(row[c], 9) for c in columns))
    most = max(result)
    per_task = result[most]["per_task"]
    names = list(dict.fromkeys(name for tasks in per_task.values() for name in tasks))
    width = max(len(name) for name in names) + 1
    lines += [
        "",
        f"per task at {most} shots:",
        f"{'task':<{width}}" + "".join(f"{c:>9}" for c in CATEGORIES),
    ]
    for name in names:
        lines.append(
            f"{name:<{width}}" + "".join(_percent(per_task[c].get(name), 9) for c in CATEGORIES)
        )
    return "\n".join(lines)


def plot_accuracy(results: dict[str, dict[int, dict]], path: str | Path) -> None:
    """Save `accuracy vs shots` to an image file: a colour per category, a line style per
    checkpoint."""
    from lm.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = ("o-", "s--", "^:", "d-.")
    colors = dict(zip(CATEGORIES, ("tab:blue", "tab:green", "tab:orange", "tab:red")))
    all_shots: set[int] = set()
    for i, (name, result) in enumerate(results.items()):
        shots = sorted(result)
        all_shots.update(shots)
        for category, color in colors.items():
            values = [result[s][category] for s in shots]
            if all(v is None for v in values):  # "unseen" when given tasks were scored
                continue
            ax.plot(
                shots,
                [100 * (v or 0) for v in values],
                styles[i % len(styles)],
                color=color,
                label=f"{name}: {category}",
            )
    ax.set_xticks(sorted(all_shots))
    ax.set_xlabel("examples in the prompt (shots)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(-2, 102)  # lines at 0% or 100% stay visible
    ax.set_title(
        "few-shot accuracy vs shots: "
        + "; ".join(f"{c} = {d}" for c, d in list(CATEGORIES.items())[:2])
        + "; ...",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as exc:
        raise LMError(f"--plot {path}: cannot save ({exc})") from exc
    finally:
        plt.close(fig)
