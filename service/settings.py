"""Server settings: one pydantic-settings object, every field also from `LM_*` variables."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lm.checkpoint import DEFAULT_CHECKPOINT


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LM_", extra="ignore")

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = Field(8000, ge=0, le=65535)
    checkpoints: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [DEFAULT_CHECKPOINT])
    api_key: SecretStr | None = None
    device: str = "auto"
    max_batch: int = Field(64, ge=1, le=1024)
    max_queue: int = Field(256, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    stream_interval: int = Field(1, ge=1, le=64)  # tokens per streamed chunk (at most)
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # GPT models
    # Limits on what one request may ask for.
    max_tokens_limit: int = Field(4096, ge=1)
    max_n: int = Field(16, ge=1)
    max_prompts: int = Field(64, ge=1)
    max_prompt_chars: int = Field(32_768, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_stop: int = Field(4, ge=0, le=16)
    max_stop_chars: int = Field(64, ge=1)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    shutdown_timeout: float = Field(30.0, ge=0)
    log_level: str = "info"

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value):
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    @field_validator("checkpoints", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value):
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value
