"""Few-shot prompts: (input, output) examples and a query -> one prompt for the model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lm.errors import LMError

DEFAULT_TEMPLATE = "{input} => {output}\n"


@dataclass(frozen=True)
class Example:
    input: str
    output: str


def split_template(template: str) -> tuple[str, str, str]:
    """The template's text before {input}, between {input} and {output}, and after {output}."""
    if template.count("{input}") != 1 or template.count("{output}") != 1:
        raise LMError(
            "a few-shot template must hold {input} and {output} once each", param="template"
        )
    head, rest = template.split("{input}")
    if "{output}" not in rest:
        raise LMError("a few-shot template must put {input} before {output}", param="template")
    middle, tail = rest.split("{output}")
    if not middle:
        raise LMError(
            "a few-shot template needs a separator between {input} and {output}", param="template"
        )
    return head, middle, tail


def build_prompt(
    examples: list[Example], query: str, template: str = DEFAULT_TEMPLATE
) -> tuple[str, list[str]]:
    """The prompt (every example, then the query up to where its output begins) and the
    default stop sequence: the template's line end, so generation ends with the answer."""
    head, middle, tail = split_template(template)
    separators = [s for s in (middle, tail) if s]
    for i, ex in enumerate(examples):
        for field_name, text in (("input", ex.input), ("output", ex.output)):
            if any(s in text for s in separators):
                raise LMError(
                    f"example {i + 1}: its {field_name} {text!r} contains the template's separator",
                    param="examples",
                )
    if any(s in query for s in separators):
        raise LMError(f"the query {query!r} contains the template's separator", param="prompt")
    shots = "".join(f"{head}{ex.input}{middle}{ex.output}{tail}" for ex in examples)
    stop = [tail] if tail else []
    return f"{shots}{head}{query}{middle}", stop


def parse_example(text: str, separator: str = "=>") -> Example:
    """`IN=>OUT` from the command line."""
    if separator not in text:
        raise LMError(f"--example {text!r}: expected INPUT{separator}OUTPUT")
    left, right = text.split(separator, 1)
    left, right = left.strip(), right.strip()
    if not left or not right:
        raise LMError(f"--example {text!r}: both input and output must be non-empty")
    return Example(left, right)


def load_examples(path: str | Path) -> list[Example]:
    """Examples from a JSON-lines file of {"input": ..., "output": ...} objects."""
    path = Path(path)
    if not path.is_file():
        raise LMError(f"--examples {path}: no such file")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            examples.append(Example(str(item["input"]), str(item["output"])))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LMError(
                f'--examples {path}, line {number}: expected {{"input", "output"}}'
            ) from exc
    if not examples:
        raise LMError(f"--examples {path}: no examples")
    return examples
