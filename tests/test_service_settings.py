"""Settings: every `lm serve` flag is a Settings field with an LM_* variable, and back;
the request's conversion to sampling parameters names the field at fault."""

from __future__ import annotations

import argparse

import pytest

from lm.errors import LMError
from service.schemas import CompletionRequest
from service.settings import Settings, add_arguments, env_name, flags, settings_from_args

# A value other than the default for every field: (flag text, env text, the field's value).
SAMPLES = {
    "checkpoints": (["a", "b"], "a,b", ["a", "b"]),
    "host": ("0.0.0.0", "0.0.0.0", "0.0.0.0"),
    "port": ("9001", "9001", 9001),
    "api_key": ("s3cret", "s3cret", "s3cret"),
    "device": ("cpu", "cpu", "cpu"),
    "dtype": ("bfloat16", "bfloat16", "bfloat16"),
    "cuda_graphs": ("false", "false", False),
    "max_batch": ("7", "7", 7),
    "max_queue": ("0", "0", 0),
    "torch_threads": ("3", "3", 3),
    "stream_interval": ("4", "4", 4),
    "stream_flush_ms": ("25", "25", 25.0),
    "stream_chunk_rate": ("2000", "2000", 2000.0),
    "kv_cache_dtype": ("float16", "float16", "float16"),
    "decode_matrices": ("int8", "int8", "int8"),
    "prefix_cache_mb": ("0", "0", 0.0),
    "max_tokens_limit": ("99", "99", 99),
    "max_n": ("3", "3", 3),
    "max_prompts": ("5", "5", 5),
    "max_prompt_chars": ("1000", "1000", 1000),
    "max_body_bytes": ("2048", "2048", 2048),
    "max_stop": ("2", "2", 2),
    "max_stop_chars": ("8", "8", 8),
    "cors_origins": (
        ["http://a.example", "http://b.example"],
        "http://a.example,http://b.example",
        ["http://a.example", "http://b.example"],
    ),
    "body_timeout": ("1.5", "1.5", 1.5),
    "header_timeout": ("2.5", "2.5", 2.5),
    "limit_concurrency": ("64", "64", 64),
    "keep_alive_timeout": ("9", "9", 9),
    "adapters": (["a=/x", "b=/y"], "a=/x,b=/y", ["a=/x", "b=/y"]),
    "shutdown_timeout": ("2.5", "2.5", 2.5),
    "log_level": ("debug", "debug", "debug"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def value(settings: Settings, field: str):
    got = getattr(settings, field)
    return got.get_secret_value() if field == "api_key" and got is not None else got


def argv(field: str, text) -> list[str]:
    texts = text if isinstance(text, list) else [text]
    return [part for item in texts for part in (flags(field)[0], item)]


def test_every_field_has_a_sample():
    assert set(SAMPLES) == set(Settings.model_fields)


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_flag_and_variable_set_the_same_field(field, monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)
    flag_text, env_text, expected = SAMPLES[field]
    default = value(Settings(), field)
    assert default != expected

    from_flag = settings_from_args(parser().parse_args(argv(field, flag_text)))
    assert value(from_flag, field) == expected
    assert value(settings_from_args(parser().parse_args([])), field) == default

    monkeypatch.setenv(env_name(field), env_text)
    assert value(settings_from_args(parser().parse_args([])), field) == expected
    # The flag wins over the variable.
    other = {
        "api_key": "other",
        "torch_threads": "5",
        "checkpoints": "z",
        "cors_origins": "z",
        "adapters": "z=/z",
    }
    monkeypatch.setenv(env_name(field), other.get(field, str(default)))
    assert value(settings_from_args(parser().parse_args(argv(field, flag_text))), field) == expected


def test_todays_flag_names_still_work():
    args = parser().parse_args(
        [
            "--checkpoint",
            "a",
            "--checkpoint",
            "b",
            "--cors-origin",
            "x",
            "--api-key",
            "k",
            "--max-tokens-limit",
            "9",
            "--kv-cache-dtype",
            "bfloat16",
            "--torch-threads",
            "2",
        ]
    )
    settings = settings_from_args(args)
    assert settings.checkpoints == ["a", "b"] and settings.cors_origins == ["x"]
    assert settings.max_tokens_limit == 9 and settings.kv_cache_dtype == "bfloat16"


@pytest.mark.parametrize(
    "bad",
    [
        ["--max-batch", "0"],
        ["--port", "70000"],
        ["--kv-cache-dtype", "int4"],
        ["--shutdown-timeout", "soon"],
        ["--max-stop", "17"],
        ["--body-timeout", "0"],
        ["--limit-concurrency", "0"],
    ],
)
def test_bad_flags_are_refused_by_the_parser(bad, capsys):
    with pytest.raises(SystemExit) as info:
        parser().parse_args(bad)
    assert info.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_a_bad_variable_names_flag_and_variable(monkeypatch):
    monkeypatch.setenv("LM_MAX_BATCH", "0")
    with pytest.raises(LMError) as info:
        settings_from_args(parser().parse_args([]))
    assert info.value.param == "max_batch"
    assert "--max-batch" in str(info.value) and "LM_MAX_BATCH" in str(info.value)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": 11}, "max_tokens"),
        ({"stop": ["a", "b", "c"]}, "stop"),
        ({"stop": "abcd"}, "stop"),
        ({"stop": ""}, "stop"),
    ],
)
def test_to_sampling_params_names_the_request_field(body, param):
    settings = Settings(checkpoints=[], max_tokens_limit=10, max_stop=2, max_stop_chars=3)
    with pytest.raises(LMError) as info:
        CompletionRequest(prompt="We", **body).to_sampling_params(settings)
    assert info.value.param == param


def test_to_sampling_params_converts_every_control():
    settings = Settings(checkpoints=[], max_tokens_limit=10)
    params = CompletionRequest(
        prompt="We", temperature=0.5, top_k=3, top_p=0.9, min_p=0.1, seed=4, stop="x", logprobs=2
    ).to_sampling_params(settings)
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.5, 3, 0.9, 0.1)
    assert (params.seed, params.stop, params.logprobs) == (4, ["x"], 2)
    assert params.max_new_tokens == 10  # the default (16) cut to the server's limit
