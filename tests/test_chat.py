"""Chat templates: the default for base models, a checkpoint's own (HF's places), the sandbox."""

from __future__ import annotations

import json

import pytest

from lm.chat import DEFAULT_STOP, ChatTemplate, load_chat_template
from lm.errors import LMError

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Who are you?"},
]


def test_default_template_makes_user_and_assistant_turns():
    prompt = ChatTemplate().render(MESSAGES)
    assert prompt == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Who are you?\nAssistant:"
    assert not ChatTemplate().render(MESSAGES, add_generation_prompt=False).endswith("Assistant:")
    assert ChatTemplate().stop == DEFAULT_STOP == ["\nUser:"]


def test_without_a_template_the_default_is_used(tmp_path):
    assert load_chat_template(tmp_path, {}) == ChatTemplate()


def test_template_from_tokenizer_config_wins_over_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}",
                "eos_token": {"content": "</s>"},
            }
        )
    )
    template = load_chat_template(tmp_path, {"chat_template": "ignored"})
    assert template.render(MESSAGES[1:2]) == "<user>Hi<assistant>"
    assert template.stop == ["</s>"] and template.eos_token == "</s>"


def test_template_from_config_json(tmp_path):
    template = load_chat_template(
        tmp_path, {"chat_template": "{{ bos_token }}{{ messages[0].content }}", "bos_token": "<s>"}
    )
    assert template.render(MESSAGES[1:2]) == "<s>Hi"
    assert template.stop == []


@pytest.mark.parametrize(
    "source",
    [
        "{{ raise_exception('only user turns') }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the sandbox refuses it
        "{% for %}",  # not a template
    ],
)
def test_template_failures_are_lm_errors_naming_messages(source):
    with pytest.raises(LMError) as info:
        ChatTemplate(source).render(MESSAGES)
    assert info.value.param == "messages"


def test_damaged_tokenizer_config_is_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(LMError, match="tokenizer_config.json"):
        load_chat_template(tmp_path, {})
