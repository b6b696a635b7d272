"""`lm generate` and `lm checkpoints` through `lm.cli.main`, against a directory of shipped
checkpoints that holds one tiny untrained model (LM_CHECKPOINTS_DIR)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from lm.checkpoint import load_checkpoint
from lm.cli import main
from lm.fewshot import Example, build_prompt
from lm.generate import Generator
from lm.sampling import SamplingParams


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, corpus_text, tiny_gpt_saver) -> Path:
    """A checkpoints directory with one model, "tiny"."""
    root = tmp_path_factory.mktemp("shipped")
    tiny_gpt_saver(root / "tiny", corpus_text + "xyz", block_size=32, training={"val_loss": 3.5})
    return root


@pytest.fixture(autouse=True)
def checkpoints_dir(shipped, monkeypatch) -> Path:
    monkeypatch.setenv("LM_CHECKPOINTS_DIR", str(shipped))
    return shipped


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """Exit status (argparse's SystemExit included), stdout and stderr of `lm ARGV`."""
    try:
        status = main(list(argv))
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def expected_text(directory: Path, prompt: str, **params) -> list[str]:
    """What the library generates for the same prompt and parameters."""
    generator = Generator(load_checkpoint(directory))
    return [c.text for c in generator.complete([prompt], SamplingParams(**params))]


def test_generate_prints_the_text_and_the_same_seed_gives_the_same_text(capsys, shipped):
    argv = [
        "generate",
        "The king",
        "--checkpoint",
        str(shipped / "tiny"),
        "--max-new-tokens",
        "20",
        "--seed",
        "1",
    ]
    status, out, err = run(capsys, *argv)
    assert status == 0, err
    assert out.endswith("\n")
    assert (
        out[:-1]
        == expected_text(shipped / "tiny", "The king", max_new_tokens=20, temperature=0.8, seed=1)[
            0
        ]
    )
    assert len(out[:-1]) >= 10  # char model: 20 tokens, a few may be unknown (empty)
    assert run(capsys, *argv)[1] == out
    assert run(capsys, *argv[:-1], "2")[1] != out


def test_generate_by_shipped_name(capsys, shipped):
    by_name = run(
        capsys, "generate", "We", "--checkpoint", "tiny", "--max-new-tokens", "12", "--seed", "3"
    )
    by_path = run(
        capsys,
        "generate",
        "We",
        "--checkpoint",
        str(shipped / "tiny"),
        "--max-new-tokens",
        "12",
        "--seed",
        "3",
    )
    assert by_name[0] == 0
    assert by_name[1] == by_path[1]


def test_generate_n_samples(capsys, shipped):
    status, out, _ = run(
        capsys,
        "generate",
        "We",
        "--checkpoint",
        "tiny",
        "--max-new-tokens",
        "15",
        "--seed",
        "4",
        "--n",
        "2",
    )
    assert status == 0
    texts = expected_text(shipped / "tiny", "We", max_new_tokens=15, temperature=0.8, seed=4)
    texts += expected_text(shipped / "tiny", "We", max_new_tokens=15, temperature=0.8, seed=5)
    assert out == (
        f"--- sample 1 (length) ---\n{texts[0]}\n--- sample 2 (length) ---\n{texts[1]}\n"
    )
    assert texts[0] != texts[1]


@pytest.mark.parametrize("prompt_args", [["-"], []])
def test_generate_reads_the_prompt_from_stdin(capsys, monkeypatch, prompt_args):
    flags = ["--checkpoint", "tiny", "--max-new-tokens", "15", "--seed", "6"]
    from_arg = run(capsys, "generate", "The king", *flags)
    monkeypatch.setattr(sys, "stdin", io.StringIO("The king"))
    from_stdin = run(capsys, "generate", *prompt_args, *flags)
    assert from_stdin[0] == 0
    assert from_stdin[1] == from_arg[1]


@pytest.mark.parametrize(
    "sampling", [["--temperature", "0"], ["--temperature", "1", "--seed", "1"]]
)
def test_generate_few_shot(capsys, shipped, sampling):
    status, out, err = run(
        capsys,
        "generate",
        "--example",
        "abc=>cba",
        "--example",
        "de=>ed",
        "xyz",
        "--checkpoint",
        "tiny",
        *sampling,
        "--max-new-tokens",
        "60",
    )
    assert status == 0, err
    prompt, stop = build_prompt([Example("abc", "cba"), Example("de", "ed")], "xyz")
    assert (prompt, stop) == ("abc => cba\nde => ed\nxyz => ", ["\n"])
    params = dict(
        max_new_tokens=60,
        temperature=float(sampling[1]),
        stop=stop,
        seed=int(sampling[3]) if len(sampling) > 2 else None,
    )
    [completion] = Generator(load_checkpoint(shipped / "tiny")).complete(
        [prompt], SamplingParams(**params)
    )
    assert out == completion.text + "\n"
    if params["seed"] is not None:  # this sample answers, then ends its line: the stop
        assert completion.finish_reason == "stop"
        assert completion.text and "\n" not in completion.text


def test_generate_few_shot_from_a_file(capsys, tmp_path):
    path = tmp_path / "examples.jsonl"
    path.write_text(
        '{"input": "abc", "output": "cba"}\n{"input": "de", "output": "ed"}\n', encoding="utf-8"
    )
    from_file = run(
        capsys,
        "generate",
        "--examples",
        str(path),
        "xyz",
        "--checkpoint",
        "tiny",
        "--temperature",
        "0",
        "--max-new-tokens",
        "30",
    )
    from_flags = run(
        capsys,
        "generate",
        "--example",
        "abc=>cba",
        "--example",
        "de=>ed",
        "xyz",
        "--checkpoint",
        "tiny",
        "--temperature",
        "0",
        "--max-new-tokens",
        "30",
    )
    assert from_file[0] == 0
    assert from_file[1] == from_flags[1]


def test_template_and_stop_typed_with_backslash_escapes(capsys):
    """`--template "{input}: {output}\\n"` as typed in a shell (a backslash and an n) means
    a line end, as the API's JSON does: the prompt and stop are the real template's."""
    common = ["xyz", "--checkpoint", "tiny", "--temperature", "0", "--max-new-tokens", "30"]
    typed = run(
        capsys, "generate", "--example", "abc=>cba", *common, "--template", r"{input}: {output}\n"
    )
    real = run(
        capsys, "generate", "--example", "abc=>cba", *common, "--template", "{input}: {output}\n"
    )
    assert typed == real and typed[0] == 0
    stopped = run(capsys, "generate", *common[:-2], "--max-new-tokens", "60", "--stop", r"\n")
    assert stopped[0] == 0 and "\n" not in stopped[1].rstrip("\n")
    prompt, stop = build_prompt([Example("abc", "cba")], "xyz", "{input}: {output}\n")
    want = (
        Generator(load_checkpoint("tiny"))
        .complete([prompt], SamplingParams(max_new_tokens=30, temperature=0.0, stop=stop))[0]
        .text
    )
    assert typed[1] == want + "\n"


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    assert err.endswith("\n")
    last = err.strip().splitlines()[-1]
    assert "error:" in last
    for fragment in fragments:
        assert fragment in last


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
        (["--max-new-tokens", "-5"], ["--max-new-tokens", "at least 1"]),
        (["--max-new-tokens", str(10**9)], ["--max-new-tokens", "at most"]),
        (["--max-new-tokens", "ten"], ["--max-new-tokens", "whole number"]),
        (["--top-p", "0"], ["--top-p", "(0, 1]"]),
        (["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
        (["--top-p", "nan"], ["--top-p"]),
        (["--temperature", "-1"], ["--temperature", ">= 0"]),
        (["--temperature", "inf"], ["--temperature", "finite"]),
        (["--top-k", "-1"], ["--top-k", ">= 0"]),
        (["--n", "0"], ["--n", "at least 1"]),
    ],
)
def test_generate_bad_flags_are_argparse_errors(capsys, flags, fragments):
    status, out, err = run(capsys, "generate", "We", "--checkpoint", "tiny", *flags)
    assert status == 2
    assert out == ""
    assert_one_line_error(err, *fragments)


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["We", "--checkpoint", "no-such-model"], ["no-such-model", "tiny"]),
        (["We", "--checkpoint", "some/missing/dir"], ["some/missing/dir", "not a directory"]),
        (["xyz", "--example", "abc"], ["--example 'abc'", "INPUT=>OUTPUT"]),
        (["xyz", "--example", "=>abc"], ["--example '=>abc'", "non-empty"]),
        (["xyz", "--template", "{input} -> {output}\n"], ["--template", "examples"]),
        (["x => y", "--example", "a=>b"], ["query"]),
        (["xyz", "--example", "a=>b", "--template", "{input}{output}"], ["separator"]),
        (["xyz", "--examples", "missing.jsonl"], ["missing.jsonl", "no such file"]),
        (["We", "--stop", ""], ["stop"]),
    ],
)
def test_generate_bad_input_is_one_line_and_status_2(capsys, argv, fragments):
    if "--checkpoint" not in argv:
        argv = [*argv, "--checkpoint", "tiny"]
    status, out, err = run(capsys, "generate", *argv)
    assert status == 2
    assert out == ""
    assert err.startswith("lm generate: error: ")
    assert len(err.strip().splitlines()) == 1
    assert_one_line_error(err, *fragments)


def test_generate_a_bad_decode_matrices_variable_is_one_line(capsys, monkeypatch):
    """LM_DECODE_MATRICES is read where a GPT's native decode step runs."""
    from lm.native import decode

    if decode.decode_step() is None:
        pytest.skip("no native decode step here (LM_NATIVE=0 or no compiler)")
    monkeypatch.setenv("LM_DECODE_MATRICES", "int4")
    status, out, err = run(capsys, "generate", "We", "--checkpoint", "tiny")
    assert status == 2
    assert out == ""
    assert_one_line_error(err, "LM_DECODE_MATRICES", "int4", "int8")


def test_generate_a_damaged_checkpoint_is_one_line(capsys, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json", encoding="utf-8")
    status, out, err = run(capsys, "generate", "We", "--checkpoint", str(tmp_path / "broken"))
    assert status == 2
    assert len(err.strip().splitlines()) == 1
    assert_one_line_error(err, "config.json")


def test_checkpoints_json_lists_the_shipped_directory(capsys):
    status, out, _ = run(capsys, "checkpoints", "--json")
    assert status == 0
    rows = json.loads(out)
    assert isinstance(rows, list)
    assert [row["name"] for row in rows] == ["tiny"]
    [row] = rows
    assert (row["model"], row["tokenizer"], row["val_loss"]) == ("gpt", "char", 3.5)
    assert isinstance(row["params"], int) and row["params"] > 0
    assert row["size_mb"] >= 0


def test_checkpoints_table(capsys):
    status, out, _ = run(capsys, "checkpoints")
    assert status == 0
    header, line = out.strip().splitlines()
    assert header.split()[:3] == ["name", "model", "tokens"]
    assert line.split()[:3] == ["tiny", "gpt", "char"]
    assert "3.5000" in line


def test_checkpoints_in_an_empty_directory(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LM_CHECKPOINTS_DIR", str(tmp_path))
    (tmp_path / "not-a-checkpoint").mkdir()  # no config.json: not listed
    status, out, _ = run(capsys, "checkpoints", "--json")
    assert status == 0
    assert json.loads(out) == []
    status, out, _ = run(capsys, "checkpoints")
    assert status == 0
    assert "no shipped checkpoints" in out
