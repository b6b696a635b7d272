"""Server settings: one pydantic-settings object that is also the `lm serve` command line.

Every field reads from an `LM_<NAME>` environment variable and from a `--<name>` flag
generated from the field (`add_arguments`), so a flag and its variable cannot drift apart:
flags override variables, variables override defaults (`settings_from_args`).
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Annotated, Literal

from pydantic import Field, SecretStr, TypeAdapter, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lm.checkpoint import DEFAULT_CHECKPOINT
from lm.device import KV_CACHE_DTYPES, MODEL_DTYPES
from lm.errors import LMError
from lm.native.decode import DECODE_MATRICES
from lm.prefix_cache import DEFAULT_CAPACITY_MB
from lm.sampling import MAX_STOP_SEQUENCES, Limits

ENV_PREFIX = "LM_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    checkpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_CHECKPOINT],
        json_schema_extra={"flag": "checkpoint"},
        description="shipped name or directory to serve (repeatable; the variable takes "
        "a comma-separated list)",
    )
    adapters: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        json_schema_extra={"flag": "adapter"},
        description="NAME=DIR: serve a LoRA adapter of a served checkpoint as model NAME, in "
        "its base's batches (repeatable; the variable takes a comma-separated list)",
    )
    host: str = Field("127.0.0.1", description="bind address (loopback unless told otherwise)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    api_key: SecretStr | None = Field(None, description="require 'Authorization: Bearer KEY'")
    device: str = Field("auto", description="auto, cpu or cuda")
    dtype: Literal[MODEL_DTYPES] = Field(
        "auto",
        description="model weights' precision (auto: as saved, float32)",
    )
    cuda_graphs: bool = Field(
        True, description="on a CUDA device, replay GPT decode steps from recorded CUDA graphs"
    )
    max_batch: int = Field(64, ge=1, le=1024, description="sequences per engine step")
    max_queue: int = Field(256, ge=0, description="waiting requests before 429")
    torch_threads: int | None = Field(
        None, ge=1, description="model CPU threads (none: one per core)"
    )
    stream_interval: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "generated tokens per streamed chunk (1: every token; more means fewer, larger "
            "server-sent events for less CPU per token)"
        ),
    )
    stream_flush_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description=(
            "hand generated tokens to the HTTP side at most this often (ms); tokens made "
            "meanwhile go out together, first tokens at once (0: after every engine step)"
        ),
    )
    stream_chunk_rate: float | None = Field(
        None,
        ge=0,
        description=(
            "most streamed chunks per second in all (0: no limit; none: 1500 when a model "
            "runs on the CPU, else no limit): the more streams run, the longer their tokens "
            "wait to go out together, a single stream hardly at all"
        ),
    )
    kv_cache_dtype: Literal[KV_CACHE_DTYPES] = Field(
        "auto",
        description=(
            "GPT KV cache precision (auto: int8 with a scale per head vector on the CPU when "
            "the native attention kernel is built, else the model's)"
        ),
    )
    decode_matrices: Literal[DECODE_MATRICES] = Field(
        "auto",
        description=(
            "GPT matrix products in CPU decode steps: float32, bfloat16 or int8 (weights "
            "per output and each step's inputs per row rounded to int8, as CTranslate2's "
            "int8; where the CPU has the instructions, float32 elsewhere); auto: bfloat16 "
            "where the CPU multiplies it in hardware, else float32"
        ),
    )
    prefix_cache_mb: float = Field(
        DEFAULT_CAPACITY_MB,
        ge=0,
        description=(
            "memory for the KV state of prompt prefixes that later requests reuse (GPT "
            "models; least recently used blocks are evicted; 0 turns prefix caching off)"
        ),
    )
    # Limits on what one request may ask for.
    max_tokens_limit: int = Field(4096, ge=1, description="most max_tokens a request may ask")
    max_n: int = Field(16, ge=1, description="most completions per request (prompts x n)")
    max_prompts: int = Field(64, ge=1, description="most prompts (or inputs) per request")
    max_prompt_chars: int = Field(32_768, ge=1, description="most characters per prompt (413)")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body (413)")
    max_stop: int = Field(
        4, ge=0, le=MAX_STOP_SEQUENCES, description="most stop sequences per request"
    )
    max_stop_chars: int = Field(64, ge=1, description="most characters per stop sequence")
    # What one client may hold: a stalled body is cut, connections are bounded.
    body_timeout: float = Field(
        30.0, gt=0, description="seconds a request body may take to arrive (408 after)"
    )
    header_timeout: float = Field(
        10.0, gt=0, description="seconds a new connection may take to send its request headers"
    )
    limit_concurrency: int = Field(
        512,
        ge=1,
        description="most open connections (or running requests) before new requests get 503",
    )
    keep_alive_timeout: int = Field(
        5, ge=1, description="seconds an idle keep-alive connection is kept open"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        json_schema_extra={"flag": "cors-origin"},
        description="allow browser calls from this origin (repeatable)",
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="seconds to finish running requests on SIGTERM"
    )
    log_level: str = Field("info", description="uvicorn's log level")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value):
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    @field_validator("checkpoints", "adapters", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value):
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def sampling_limits(self) -> Limits:
        """This server's limits on a request's sampling parameters."""
        return Limits(
            max_new_tokens=self.max_tokens_limit,
            max_stop=self.max_stop,
            max_stop_chars=self.max_stop_chars,
        )


def env_name(field: str) -> str:
    """The environment variable of a Settings field."""
    return f"{ENV_PREFIX}{field.upper()}"


def flags(field: str) -> list[str]:
    """The command-line flags of a Settings field: its name with dashes (list fields also
    answer to their singular flag, the one to repeat)."""
    info = Settings.model_fields[field]
    names = [f"--{field.replace('_', '-')}"]
    extra = info.json_schema_extra or {}
    if "flag" in extra:
        names.insert(0, f"--{extra['flag']}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field: type and choices from its annotation, help from its
    description. Unset flags stay None, so that variables and defaults apply."""
    for name, info in Settings.model_fields.items():
        kwargs: dict = {
            "dest": name,
            "default": None,
            "help": f"{info.description} (env {env_name(name)}; default {_default_text(info)})",
        }
        annotation = _unwrap(info.annotation)
        if typing.get_origin(annotation) is list:
            kwargs["action"] = "append"
            kwargs["metavar"] = name.upper().rstrip("S")
        elif typing.get_origin(annotation) is Literal:
            kwargs["choices"] = typing.get_args(annotation)
        else:
            kwargs["type"] = _field_type(name)
            kwargs["metavar"] = name.upper()
        parser.add_argument(*flags(name), **kwargs)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from parsed flags over `LM_*` variables over defaults."""
    given = {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else None
        where = flags(field)[0] if field in Settings.model_fields else field
        raise LMError(f"{where} (or {env_name(field)}): {first['msg']}", param=field) from None


def _unwrap(annotation):
    """`X | None` -> X (the flag's type is X; leaving the flag out means None)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _field_type(name: str):
    """An argparse type that checks a flag's text as the field would (range included)."""
    info = Settings.model_fields[name]
    annotation = info.annotation
    adapter = TypeAdapter(Annotated[(annotation, *info.metadata)] if info.metadata else annotation)

    def parse(text: str):
        try:
            adapter.validate_python(text)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(exc.errors()[0]["msg"]) from None
        return text  # Settings converts it (and applies its own validators)

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def _default_text(info) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        return ", ".join(value) if value else "none"
    return "none" if info.default is None else str(info.default)
