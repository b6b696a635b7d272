"""The playground at /: served without the API key, and driven in a real (headless) Chromium
against a real `lm serve`, compared with what the API answers for the same request."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from subprocess_server import lm_serve

from service.routes.playground import page_html

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

API_KEY = "playground-test-key"
PROMPT = "The king"
# The sampling fields the page's controls set, by element id.
PARAMS = {"max_tokens": 48, "temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 1234}
FIELDS = {
    "max_tokens": "#max-tokens",
    "temperature": "#temperature",
    "top_k": "#top-k",
    "top_p": "#top-p",
    "seed": "#seed",
}
RUNNING_METRICS = ("vllm:num_requests_running", "lm_requests_running")


# -- without a browser ---------------------------------------------------------------------


def test_page_is_served_without_the_api_key(start_server):
    server = start_server(api_key=API_KEY)
    response = httpx.get(f"{server.url}/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<title>lm playground</title>" in response.text
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # the API still needs it


def test_page_is_self_contained():
    html = page_html()
    assert not re.search(r"\b(src|href)\s*=", html), "the page links to another file"
    assert "@import" not in html and "url(" not in html
    assert not re.search(r"https?://", html), "the page names an outside address"


def test_page_ships_in_the_wheel():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "static/*.html" in pyproject["tool"]["setuptools"]["package-data"]["service"]


# -- in Chromium ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_checkpoint_dir: Path):
    """`lm serve` in a subprocess, with an API key and room for very long generations."""
    with lm_serve(
        tiny_checkpoint_dir, "--max-tokens-limit", "200000", env={"LM_API_KEY": API_KEY}
    ) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip(
            "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served: str):
    """The playground at desktop size, the API key entered and the models loaded."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    # Console errors (a CSP violation among them), but not the browser's note of each 4xx.
    page.on(
        "console",
        lambda msg: (
            problems.append(msg.text)
            if msg.type == "error" and not msg.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.goto(f"{served}/")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")  # a change event: the page loads the models with the key
    page.wait_for_function("() => document.querySelector('#model').value === 'tiny'")
    page.problems = problems
    yield page
    context.close()


def _api_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def _set_params(page, params: dict) -> None:
    for field, value in params.items():
        page.fill(FIELDS[field], str(value))


def _generate(page) -> str:
    """Ctrl+Enter, wait for the finish, and return exactly the text the page shows."""
    page.press("#prompt", "Control+Enter")
    page.wait_for_function(
        "() => document.querySelector('#generate').disabled === false && "
        "/finished|Failed/.test(document.querySelector('#status').textContent)"
    )
    return page.evaluate("document.querySelector('#completion').textContent")


def _running(url: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=_api_headers()).text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.split("{")[0].split(" ")[0] in RUNNING_METRICS
    ]
    assert values, "no running-requests metric in /metrics"
    return sum(values)


def _wait_running(url: str, predicate, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = _running(url)
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def _save(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path))
    target = os.environ.get("LM_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path


def test_page_shows_exactly_the_api_text_for_a_seeded_request(page, served: str, tmp_path: Path):
    page.fill("#prompt", PROMPT)
    _set_params(page, PARAMS)
    shown = _generate(page)
    answer = httpx.post(
        f"{served}/v1/completions",
        headers=_api_headers(),
        json={"model": "tiny", "prompt": PROMPT, **PARAMS},
    ).json()
    assert shown == answer["choices"][0]["text"]
    assert len(shown) > 0
    assert page.is_hidden("#error")
    # Token probabilities: coloured spans (one per token, or per chunk where the tokens do
    # not spell its text, as `<unk>` does not), each with a tooltip of the alternatives.
    spans = page.locator("#completion .tok")
    counts = [int(n) for n in spans.evaluate_all("(spans) => spans.map((s) => s.dataset.tokens)")]
    assert sum(counts) == answer["usage"]["completion_tokens"]
    colours = spans.evaluate_all("(spans) => spans.map((s) => s.style.backgroundColor)")
    assert all(c.startswith("rgb(") for c in colours) and len(set(colours)) > 1
    spans.nth(3).hover()
    assert page.is_visible("#tooltip")
    assert page.locator("#tooltip tr").count() == 5  # logprobs: 5
    assert "p = " in page.inner_text("#tooltip")
    # The key is kept for this tab's session only.
    assert page.evaluate("sessionStorage.getItem('lm.apiKey')") == API_KEY
    assert page.evaluate("localStorage.length") == 0
    assert page.problems == []
    _save(page, tmp_path, "playground-1280x800.png")
    page.set_viewport_size({"width": 390, "height": 844})
    page.mouse.move(0, 0)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scroll
    _save(page, tmp_path, "playground-390x844.png")


def test_few_shot_examples_reach_the_api(page, served: str):
    examples = [{"input": "jid", "output": "JID"}, {"input": "ukado", "output": "UKADO"}]
    page.fill("#examples .example:nth-child(1) .ex-in", examples[0]["input"])
    page.fill("#examples .example:nth-child(1) .ex-out", examples[0]["output"])
    page.click("#add-example")
    page.keyboard.type(examples[1]["input"])  # the new row's input has the focus
    page.keyboard.press("Tab")
    page.keyboard.type(examples[1]["output"])
    page.fill("#prompt", "zoli")
    _set_params(page, {"max_tokens": 12, "temperature": 0.5, "seed": 7})
    shown = _generate(page)
    answer = httpx.post(
        f"{served}/v1/completions",
        headers=_api_headers(),
        json={
            "model": "tiny",
            "prompt": "zoli",
            "examples": examples,
            "max_tokens": 12,
            "temperature": 0.5,
            "seed": 7,
        },
    ).json()
    assert shown == answer["choices"][0]["text"]


def test_stop_cancels_the_request_and_the_server_frees_the_slot(page, served: str):
    page.uncheck("#logprobs")
    page.fill("#prompt", PROMPT)
    _set_params(page, {"max_tokens": 200000, "temperature": 1.0})
    page.press("#prompt", "Control+Enter")
    page.wait_for_function("() => document.querySelector('#completion').textContent.length > 20")
    assert _wait_running(served, lambda v: v >= 1, timeout=5) >= 1
    page.keyboard.press("Escape")
    page.wait_for_function("() => /Stopped/.test(document.querySelector('#status').textContent)")
    assert _wait_running(served, lambda v: v == 0, timeout=5) == 0
    assert page.is_enabled("#generate") and page.is_disabled("#stop")
    assert page.is_hidden("#error")


def test_a_bad_value_shows_the_api_message(page, served: str):
    page.fill("#prompt", PROMPT)
    page.fill("#temperature", "-1")
    page.press("#temperature", "Enter")  # Enter in a field generates too
    page.wait_for_selector("#error", state="visible")
    answer = httpx.post(
        f"{served}/v1/completions",
        headers=_api_headers(),
        json={
            "model": "tiny",
            "prompt": PROMPT,
            "max_tokens": 128,
            "temperature": -1,
            "top_k": 0,
            "top_p": 1,
            "stream": True,
        },
    )
    assert answer.status_code == 400
    assert page.inner_text("#error-message") == answer.json()["error"]["message"]
    assert "400" in page.inner_text("#error-title")


def test_chat_mode_shows_the_reply(page, served: str):
    page.check("input[name=mode][value=chat]")
    page.fill("#prompt", "Hello")
    _set_params(page, {"max_tokens": 16, "temperature": 0.7, "seed": 3})
    page.press("#prompt", "Control+Enter")
    page.wait_for_function("() => document.querySelector('#generate').disabled === false")
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 16,
        "temperature": 0.7,
        "top_k": 0,
        "top_p": 1,
        "seed": 3,
        "logprobs": True,
        "top_logprobs": 5,
    }
    answer = httpx.post(f"{served}/v1/chat/completions", headers=_api_headers(), json=body)
    assert answer.status_code == 200, answer.text
    shown = page.evaluate("document.querySelector('#completion').textContent")
    assert shown == answer.json()["choices"][0]["message"]["content"]


def test_chat_mode_shows_the_api_error(page, served: str):
    page.check("input[name=mode][value=chat]")
    page.fill("#prompt", "Hello")
    page.fill("#temperature", "-1")
    page.press("#prompt", "Control+Enter")
    page.wait_for_selector("#error", state="visible")
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello"}],
        "temperature": -1,
        "stream": True,
    }
    answer = httpx.post(f"{served}/v1/chat/completions", headers=_api_headers(), json=body)
    assert answer.status_code == 400
    assert page.inner_text("#error-message") == answer.json()["error"]["message"]
    assert page.input_value("#prompt") == "Hello"  # the message is kept to send again


def test_every_control_has_a_label_and_is_reachable_by_keyboard(page):
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter((e) => e.offsetParent !== null)
        .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                       && !(e.tagName === 'BUTTON' && e.textContent.trim()))
        .map((e) => e.id || e.outerHTML)""")
    assert unlabelled == []
    page.focus("#api-key")
    reached = set()
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement.id"))
    assert {
        "model",
        "prompt",
        "generate",
        "max-tokens",
        "temperature",
        "top-k",
        "top-p",
        "seed",
        "logprobs",
        "add-example",
        "template",
        "output",
    } <= reached
