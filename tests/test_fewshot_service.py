"""The shipped few-shot GPT behind the server: `examples` + a held-out query -> the answer."""

from __future__ import annotations

import httpx
import pytest

from lm.checkpoint import load_checkpoint, shipped_checkpoints
from lm.tasks import eval_episodes, is_heldout
from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.skipif(
    "fewshot-char-gpt" not in shipped_checkpoints(), reason="fewshot-char-gpt is not shipped"
)


@pytest.fixture(scope="module")
def server(launch):
    checkpoint = load_checkpoint("fewshot-char-gpt")
    return launch(create_app(Settings(checkpoints=["fewshot-char-gpt"]), [checkpoint]))


# Tasks the shipped model does reliably (see its card); held-out real words only.
@pytest.mark.parametrize("task", ["upper", "repeat", "length"])
def test_examples_and_a_heldout_query_give_the_answer(server, task):
    episodes = [e for e in eval_episodes("words", 60, seed=0, shots=4) if e.task == task][:3]
    assert episodes
    for episode in episodes:
        assert is_heldout(episode.query)
        body = {
            "model": "fewshot-char-gpt",
            "prompt": episode.query,
            "temperature": 0,
            "max_tokens": 24,
            "examples": [{"input": e.input, "output": e.output} for e in episode.examples],
        }
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["text"] == episode.answer
        assert choice["finish_reason"] == "stop"
