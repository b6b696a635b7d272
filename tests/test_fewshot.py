"""Few-shot prompts: templates, separators, stop sequences, examples from the command line
and from JSON-lines files."""

from __future__ import annotations

import json

import pytest

from lm.errors import LMError
from lm.fewshot import DEFAULT_TEMPLATE, Example, build_prompt, load_examples, parse_example

EXAMPLES = [Example("abc", "cba"), Example("de", "ed")]


def test_default_template_and_stop():
    prompt, stop = build_prompt(EXAMPLES, "xyz")
    assert prompt == "abc => cba\nde => ed\nxyz => "
    assert stop == ["\n"]
    assert DEFAULT_TEMPLATE == "{input} => {output}\n"


def test_zero_shot_is_the_query_alone():
    assert build_prompt([], "xyz") == ("xyz => ", ["\n"])


def test_custom_template():
    template = "Q: {input}\nA: {output}\n\n"
    prompt, stop = build_prompt(EXAMPLES, "xyz", template)
    assert prompt == "Q: abc\nA: cba\n\nQ: de\nA: ed\n\nQ: xyz\nA: "
    assert stop == ["\n\n"]


def test_template_without_a_tail_has_no_default_stop():
    prompt, stop = build_prompt(EXAMPLES, "xyz", "[{input}->{output}]")
    assert prompt == "[abc->cba][de->ed][xyz->"
    assert stop == ["]"]
    prompt, stop = build_prompt(EXAMPLES, "xyz", "{input}->{output}")
    assert prompt == "abc->cbade->edxyz->"
    assert stop == []


@pytest.mark.parametrize(
    "template",
    [
        "{input} => \n",  # no {output}
        "{output}\n",  # no {input}
        "plain text",
        "{input} {input} => {output}\n",
        "{input} => {output} {output}\n",
        "{output} => {input}\n",  # output before input
        "{input}{output}\n",  # no separator between them
    ],
)
def test_bad_templates_are_refused(template):
    with pytest.raises(LMError, match="template"):
        build_prompt(EXAMPLES, "xyz", template)


@pytest.mark.parametrize(
    ("example", "number", "field"),
    [
        (Example("a => b", "c"), 2, "input"),
        (Example("a", "b => c"), 2, "output"),
        (Example("two\nlines", "c"), 2, "input"),
        (Example("a", "line\n"), 2, "output"),
    ],
)
def test_an_example_holding_a_separator_is_refused_by_number(example, number, field):
    with pytest.raises(LMError) as error:
        build_prompt([EXAMPLES[0], example], "xyz")
    message = str(error.value)
    assert f"example {number}" in message
    assert field in message
    assert repr(getattr(example, field)) in message


@pytest.mark.parametrize("query", ["x => y", "two\nlines"])
def test_a_query_holding_a_separator_is_refused(query):
    with pytest.raises(LMError, match="query"):
        build_prompt(EXAMPLES, query)


def test_separators_of_a_custom_template_are_the_ones_checked():
    # " => " is harmless with another template; that template's own separator is not.
    prompt, _ = build_prompt([Example("a => b", "c")], "q", "{input} -> {output}\n")
    assert prompt == "a => b -> c\nq -> "
    with pytest.raises(LMError, match="example 1"):
        build_prompt([Example("a -> b", "c")], "q", "{input} -> {output}\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=>b", Example("a", "b")),
        ("abc=>cba", Example("abc", "cba")),
        (" a b => c d ", Example("a b", "c d")),
        ("a=>b=>c", Example("a", "b=>c")),
    ],
)
def test_parse_example(text, expected):
    assert parse_example(text) == expected


@pytest.mark.parametrize("text", ["ab", "=>b", "a=>", "=>", " => ", ""])
def test_parse_example_refuses_malformed_text(text):
    with pytest.raises(LMError, match="--example"):
        parse_example(text)


def test_load_examples(tmp_path):
    path = tmp_path / "examples.jsonl"
    lines = [
        json.dumps({"input": "abc", "output": "cba"}),
        "",
        json.dumps({"input": "日本", "output": "本日", "note": "extra keys are fine"}),
        json.dumps({"input": 12, "output": 21}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_examples(path) == [
        Example("abc", "cba"),
        Example("日本", "本日"),
        Example("12", "21"),
    ]
    assert load_examples(str(path)) == load_examples(path)


@pytest.mark.parametrize(
    "bad_line",
    [
        "not json",
        json.dumps({"input": "a"}),
        json.dumps({"output": "a"}),
        json.dumps(["a", "b"]),
        json.dumps("a=>b"),
        json.dumps(3),
    ],
)
def test_load_examples_names_the_bad_line(tmp_path, bad_line):
    path = tmp_path / "examples.jsonl"
    good = json.dumps({"input": "a", "output": "b"})
    path.write_text(f"{good}\n{good}\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(LMError, match="line 3"):
        load_examples(path)


def test_load_examples_missing_or_empty_file(tmp_path):
    with pytest.raises(LMError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(LMError, match="no examples"):
        load_examples(empty)
