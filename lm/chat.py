"""Chat messages -> one prompt, by a checkpoint's Jinja chat template or the default one.

A checkpoint may carry a template as Hugging Face does (`chat_template` in its
`tokenizer_config.json`, or in `config.json`); it is rendered in Jinja's sandbox with
`messages`, `add_generation_prompt`, `bos_token` and `eos_token`. Base models without one
get `DEFAULT_TEMPLATE`: "User: ..." and "Assistant: ..." turns, one per line, ending in
"Assistant:", with generation stopped at the next "\\nUser:" (as llama-server does for
models without a template).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lm.errors import LMError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_STOP = ["\nUser:"]


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the stop sequences that end an assistant turn."""

    source: str = DEFAULT_TEMPLATE
    stop: list[str] = field(default_factory=lambda: list(DEFAULT_STOP))
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` (dicts with "role" and "content"); LMError if the
        template fails (a template may refuse a conversation with `raise_exception`)."""
        try:
            template = _environment().from_string(self.source)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as exc:
            raise LMError(
                f"the chat template failed on these messages: {exc}", param="messages"
            ) from None


def load_chat_template(directory: Path, meta: dict | None = None) -> ChatTemplate:
    """The checkpoint's own template (tokenizer_config.json first, then config.json), or
    the default one. A template of its own stops only at its eos token, if it has one."""
    sources = [meta or {}]
    tokenizer_config = Path(directory) / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            sources.insert(0, json.loads(tokenizer_config.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LMError(f"{tokenizer_config}: damaged ({exc})") from None
    for source in sources:
        template = source.get("chat_template") if isinstance(source, dict) else None
        if isinstance(template, list):  # HF's named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            eos, bos = _token(source.get("eos_token")), _token(source.get("bos_token"))
            return ChatTemplate(template, [eos] if eos else [], bos, eos)
    return ChatTemplate()


def _token(value) -> str:
    """A special token as HF configs write it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _raise_exception(message: str):
    raise TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env
