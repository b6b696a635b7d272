"""Load-test scenarios for the OpenAI-compatible server: a realistic mix of requests.

Run it with `lm loadtest` (headless, prints a summary) or with locust itself:
    locust -f service/locustfile.py --host http://127.0.0.1:8000

Environment: LM_MODEL (default shakespeare-char-gpt), LM_FEWSHOT_MODEL (default LM_MODEL),
LM_API_KEY (sent as a bearer token when set). Self-contained: imports nothing from `lm`,
so that the stock locust image can run it.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterable

import gevent
import locust.stats
from locust import HttpUser, between, events, task
from requests.exceptions import RequestException

MODEL = os.environ.get("LM_MODEL") or "shakespeare-char-gpt"
FEWSHOT_MODEL = os.environ.get("LM_FEWSHOT_MODEL") or MODEL
API_KEY = os.environ.get("LM_API_KEY") or None
COMPLETIONS = "/v1/completions"
FINISH_REASONS = {"stop", "length"}

SHORT_PROMPTS = [
    "ROMEO:\n",
    "JULIET:\nO ",
    "First Citizen:\n",
    "KING HENRY VI:\n",
    "MENENIUS:\nI tell you, friends,",
    "To be, or not",
    "What light through ",
    "GLOUCESTER:\nNow is the ",
    "My lord, ",
    "\n",
]

LONG_PROMPTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\n"
    "Resolved. resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy "
    "to the people.\n\nAll:\nWe know't, we know't.\n\nFirst Citizen:\nLet us kill him, and "
    "we'll have corn at our own price.\nIs't a verdict?\n\n",
    "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind "
    "to suffer\nThe slings and arrows of outrageous fortune,\nOr to take arms against a sea "
    "of troubles\nAnd by opposing end them. To die, to sleep,\nNo more; and by a sleep to "
    "say we end\nThe heart-ache and the thousand natural shocks\nThat flesh is heir to: "
    "'tis a consummation\nDevoutly to be wish'd.\n",
    "GLOUCESTER:\nNow is the winter of our discontent\nMade glorious summer by this sun of "
    "York;\nAnd all the clouds that lour'd upon our house\nIn the deep bosom of the ocean "
    "buried.\nNow are our brows bound with victorious wreaths;\nOur bruised arms hung up for "
    "monuments;\nOur stern alarums changed to merry meetings,\nOur dreadful marches to "
    "delightful measures.\n",
    "PORTIA:\nThe quality of mercy is not strain'd,\nIt droppeth as the gentle rain from "
    "heaven\nUpon the place beneath: it is twice blest;\nIt blesseth him that gives and him "
    "that takes:\n'Tis mightiest in the mightiest: it becomes\nThe throned monarch better "
    "than his crown;\nHis sceptre shows the force of temporal power,\nThe attribute to awe "
    "and majesty.\n",
    "JAQUES:\nAll the world's a stage,\nAnd all the men and women merely players:\nThey have "
    "their exits and their entrances;\nAnd one man in his time plays many parts,\nHis acts "
    "being seven ages. At first the infant,\nMewling and puking in the nurse's arms.\nAnd "
    "then the whining school-boy, with his satchel\nAnd shining morning face, creeping like "
    "snail\nUnwillingly to school.\n",
    "MACBETH:\nTo-morrow, and to-morrow, and to-morrow,\nCreeps in this petty pace from day "
    "to day\nTo the last syllable of recorded time,\nAnd all our yesterdays have lighted "
    "fools\nThe way to dusty death. Out, out, brief candle!\nLife's but a walking shadow, a "
    "poor player\nThat struts and frets his hour upon the stage\nAnd then is heard no more.\n",
]

# Archaic word -> modern word: a few-shot task a small model can at least attempt.
FEWSHOT_PAIRS = [
    ("thou", "you"),
    ("thee", "you"),
    ("thy", "your"),
    ("art", "are"),
    ("hath", "has"),
    ("doth", "does"),
    ("ere", "before"),
    ("hither", "here"),
    ("wherefore", "why"),
    ("prithee", "please"),
    ("anon", "soon"),
    ("oft", "often"),
]
# None leaves the server's default template ("{input} => {output}\n").
FEWSHOT_TEMPLATES = [None, "Old: {input}\nNew: {output}\n\n"]


def _sampling() -> dict:
    """Sampling parameters as varied as real clients send them."""
    params = {
        "temperature": random.choice([0.0, 0.7, 0.8, 1.0]),
        "top_p": random.choice([1.0, 1.0, 0.9]),
        "top_k": random.choice([0, 0, 40]),
    }
    if random.random() < 0.3:
        params["seed"] = random.randrange(2**31)
    return params


class CompletionsUser(HttpUser):
    """One client of the completions API; tasks are picked in proportion to their weights."""

    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    @task(6)
    def short_prompt(self) -> None:
        prompts: str | list[str] = random.choice(SHORT_PROMPTS)
        n = random.choice([1, 1, 1, 2])
        expected = n
        if random.random() < 0.2:  # a batch of prompts in one request
            prompts = random.sample(SHORT_PROMPTS, 2)
            expected = 2 * n
        body = {
            "model": MODEL,
            "prompt": prompts,
            "max_tokens": random.randint(16, 64),
            "n": n,
            **_sampling(),
        }
        self._complete(body, expected, name=f"{COMPLETIONS} short")

    @task(3)
    def long_prompt(self) -> None:
        body = {
            "model": MODEL,
            "prompt": random.choice(LONG_PROMPTS),
            "max_tokens": random.randint(32, 96),
            **_sampling(),
        }
        self._complete(body, 1, name=f"{COMPLETIONS} long")

    @task(4)
    def streaming(self) -> None:
        prompt = random.choice(SHORT_PROMPTS + LONG_PROMPTS)
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": random.randint(32, 128),
            "stream": True,
            "stream_options": {"include_usage": True},
            **_sampling(),
        }
        self._stream(body, name=f"{COMPLETIONS} stream")

    @task(2)
    def few_shot(self) -> None:
        pairs = random.sample(FEWSHOT_PAIRS, 5)
        body = {
            "model": FEWSHOT_MODEL,
            "prompt": pairs[-1][0],
            "max_tokens": 12,
            "temperature": 0.0,
            "examples": [{"input": i, "output": o} for i, o in pairs[:-1]],
        }
        template = random.choice(FEWSHOT_TEMPLATES)
        if template is not None:
            body["template"] = template
        self._complete(body, 1, name=f"{COMPLETIONS} few-shot")

    @task(1)
    def models(self) -> None:
        with self.client.get("/v1/models", name="/v1/models", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(_status_message(response))
                return
            try:
                ids = [m["id"] for m in response.json()["data"]]
            except (ValueError, KeyError, TypeError):
                response.failure("not an OpenAI model list")
                return
            if MODEL not in ids:
                response.failure(f"model {MODEL!r} not listed (got {ids})")

    @task(1)
    def health(self) -> None:
        with self.client.get("/health", name="/health", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(_status_message(response))
                return
            try:
                status = response.json().get("status")
            except (ValueError, AttributeError):
                status = None
            if status != "ok":
                response.failure(f"health status {status!r}")

    def _complete(self, body: dict, expected_choices: int, name: str) -> None:
        """A non-streaming completion; fails on any status but 200 or a malformed body."""
        with self.client.post(COMPLETIONS, json=body, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(_status_message(response))
                return
            try:
                choices = response.json()["choices"]
            except (ValueError, KeyError, TypeError):
                response.failure("response without choices")
                return
            problem = _check_choices(choices, expected_choices)
            if problem:
                response.failure(problem)

    def _stream(self, body: dict, name: str) -> None:
        """A streaming completion, read to `data: [DONE]`; its response time is the whole
        stream, not just the headers."""
        start = time.perf_counter()
        with self.client.post(
            COMPLETIONS, json=body, name=name, stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(_status_message(response))
                return
            lines = response.iter_lines(chunk_size=None, decode_unicode=True)
            problem, size = check_stream(lines, want_usage=True)
            response.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            response.request_meta["response_length"] = size
            if problem:
                response.failure(problem)


def check_stream(lines: Iterable[str], want_usage: bool) -> tuple[str | None, int]:
    """Read server-sent events to `data: [DONE]`: what is wrong with them (or None), and
    how many characters were read."""
    chunks, finished, usage, size = 0, False, False, 0
    try:
        for line in lines:
            size += len(line) + 1
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return f"error event: {event['error']}", size
            choices = event.get("choices") or []
            chunks += bool(choices)
            finished |= any(c.get("finish_reason") in FINISH_REASONS for c in choices)
            usage |= bool(event.get("usage"))
        else:
            return f"stream ended after {chunks} chunks without data: [DONE]", size
    except (RequestException, ValueError, AttributeError) as exc:
        return f"stream broken after {chunks} chunks: {exc!r}", size
    if chunks == 0:
        return "stream without a single choice chunk", size
    if not finished:
        return "stream without a finish_reason", size
    if want_usage and not usage:
        return "stream_options.include_usage set but no usage chunk", size
    return None, size


@events.quitting.add_listener
def _final_csv_rows(environment, **_kwargs) -> None:
    """Locust rewrites *_stats.csv every CSV_STATS_INTERVAL_SEC but not at exit, so the file
    would miss the last second of the run (locust issue #1806): give its writer one more turn."""
    if getattr(environment.parsed_options, "csv_prefix", None):
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.2)


def _check_choices(choices: object, expected: int) -> str | None:
    """What is wrong with a response's choices, or None."""
    if not isinstance(choices, list) or not choices:
        return "response without choices"
    if len(choices) != expected:
        return f"expected {expected} choices, got {len(choices)}"
    for choice in choices:
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
            return "a choice without text"
        if choice.get("finish_reason") not in FINISH_REASONS:
            return f"finish_reason {choice.get('finish_reason')!r}"
    return None


def _status_message(response) -> str:
    """`HTTP 429: queue full`, from an OpenAI-style error body when there is one."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = (response.text or "")[:200]
    return f"HTTP {response.status_code}: {message}"
