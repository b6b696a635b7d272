"""The HTTP server through the official `openai` client: completions, streaming, sampling
options, few-shot, models, health, metrics, docs, and continuous batching."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest

from lm.checkpoint import load_checkpoint
from lm.engine import Engine
from lm.sampling import SamplingParams

PROMPT = "The king speaks of"


@pytest.fixture(scope="module")
def server(live_server):
    return live_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)


def complete(client: openai.OpenAI, **kwargs):
    return client.completions.create(model="tiny", **{"prompt": PROMPT, **kwargs})


def greedy_text(client: openai.OpenAI, prompt: str = PROMPT, max_tokens: int = 40) -> str:
    return complete(client, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


# -- completions ----------------------------------------------------------------------------


def test_plain_completion(client):
    response = complete(client, max_tokens=12, seed=3)
    assert response.object == "text_completion"
    assert response.model == "tiny"
    assert response.id.startswith("cmpl-")
    [choice] = response.choices
    assert choice.index == 0
    assert choice.finish_reason == "length"
    assert isinstance(choice.text, str) and 0 < len(choice.text) <= 12
    # A char tokenizer: one prompt token per character (all of them in the vocabulary).
    assert response.usage.prompt_tokens == len(PROMPT)
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == len(PROMPT) + 12


def test_streaming_equals_non_streaming(client):
    whole = complete(client, max_tokens=30, seed=11)
    chunks = list(complete(client, max_tokens=30, seed=11, stream=True))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert all(f is None for f in finishes[:-1])
    assert all(c.model == "tiny" and c.id == chunks[0].id for c in chunks)


def test_streaming_ends_with_done(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: ") :])
    assert last["choices"][0]["finish_reason"] == "length"


def test_streaming_include_usage(client):
    chunks = list(
        complete(client, max_tokens=10, seed=5, stream=True, stream_options={"include_usage": True})
    )
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), 10)
    assert usage.total_tokens == len(PROMPT) + 10


def test_n_choices(client):
    response = complete(client, max_tokens=6, n=3, seed=1)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in response.choices)
    assert response.usage.completion_tokens == 18
    assert response.usage.prompt_tokens == len(PROMPT)


def test_list_of_prompts(client):
    prompts = ["The king", "A young poet", "We"]
    response = complete(client, prompt=prompts, max_tokens=5, n=2, temperature=0)
    assert [c.index for c in response.choices] == list(range(6))
    assert response.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert response.usage.completion_tokens == 30
    # Greedy: the two samples of one prompt agree, and each equals that prompt alone.
    for index, prompt in enumerate(prompts):
        first, second = response.choices[2 * index], response.choices[2 * index + 1]
        assert first.text == second.text == greedy_text(client, prompt, max_tokens=5)


def test_stop_sequence(client):
    greedy = greedy_text(client, max_tokens=40)
    stop = greedy[10:12]
    assert len(stop) == 2
    response = complete(client, max_tokens=40, temperature=0, stop=[stop])
    [choice] = response.choices
    assert stop not in choice.text
    assert choice.finish_reason == "stop"
    assert choice.text == greedy[: greedy.index(stop)]
    streamed = "".join(
        c.choices[0].text
        for c in complete(client, max_tokens=40, temperature=0, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == choice.text


def test_stop_not_hit_is_length(client):
    response = complete(client, max_tokens=8, temperature=0, stop=["\u00a7never\u00a7"])
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].text == greedy_text(client, max_tokens=8)


def test_seed_reproducible(client):
    first = complete(client, max_tokens=20, seed=42).choices[0].text
    second = complete(client, max_tokens=20, seed=42).choices[0].text
    assert first == second
    others = {complete(client, max_tokens=20, seed=seed).choices[0].text for seed in range(4)}
    assert len(others | {first}) > 1


def test_logprobs(client):
    response = complete(client, max_tokens=10, logprobs=2, seed=9)
    [choice] = response.choices
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == response.usage.completion_tokens == 10
    assert len(logprobs.token_logprobs) == 10
    assert all(value <= 0 for value in logprobs.token_logprobs)
    assert len(logprobs.top_logprobs) == 10
    for top in logprobs.top_logprobs:
        assert 1 <= len(top) <= 2
        assert all(value <= 0 for value in top.values())
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_echo_prefixes_prompt(client):
    plain = complete(client, max_tokens=6, seed=4).choices[0].text
    echoed = complete(client, max_tokens=6, seed=4, echo=True).choices[0].text
    assert echoed == PROMPT + plain
    streamed = "".join(
        c.choices[0].text
        for c in complete(client, max_tokens=6, seed=4, echo=True, stream=True)
        if c.choices
    )
    assert streamed == echoed


def test_few_shot_extension(client):
    examples = [{"input": "cat", "output": "tac"}, {"input": "dog", "output": "god"}]
    response = complete(
        client,
        prompt="sun",
        max_tokens=20,
        temperature=0,
        echo=True,
        extra_body={"examples": examples},
    )
    [choice] = response.choices
    prompt = "cat => tac\ndog => god\nsun => "
    assert choice.text.startswith(prompt)
    assert "\n" not in choice.text[len(prompt) :]  # the template's line end is the default stop
    assert response.usage.prompt_tokens == len(prompt)


def test_top_k_extension(client):
    response = complete(client, max_tokens=10, seed=2, extra_body={"top_k": 1})
    assert response.choices[0].text == greedy_text(client, max_tokens=10)


def test_default_model_when_omitted(server):
    r = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "We", "max_tokens": 3}, timeout=30
    )
    assert r.status_code == 200
    assert r.json()["model"] == "tiny"


# -- other routes ---------------------------------------------------------------------------


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].object == "model"


def test_health(server):
    r = httpx.get(f"{server.url}/health", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["models"] == ["tiny"]
    assert body["running"] == 0 and body["waiting"] == 0


def test_a_running_server_keeps_its_start_up_objects_out_of_the_collector(server):
    """What was alive at start-up (libraries, the model) is frozen: a full collection does
    not walk it (it stopped the event loop and the engine for ~200 ms a time)."""
    import gc

    assert gc.get_freeze_count() > 10_000


def test_min_p(client):
    """min_p 1 keeps only the most likely token (greedy, whatever the seed and temperature);
    0 is the default; a small one changes nothing but the tail."""
    greedy = greedy_text(client, max_tokens=24)
    for seed in (1, 2):
        top_only = complete(
            client, max_tokens=24, temperature=1.5, seed=seed, extra_body={"min_p": 1.0}
        )
        assert top_only.choices[0].text == greedy
        default = complete(client, max_tokens=24, seed=seed).choices[0].text
        zero = complete(client, max_tokens=24, seed=seed, extra_body={"min_p": 0.0})
        assert zero.choices[0].text == default


def scrape(server) -> dict[str, float]:
    """/metrics as {series with labels: value}."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_metrics_have_vllm_names_and_meanings(client, server):
    """vLLM's series, labelled model_name: a request is counted once in each histogram,
    inter-token latency once per generated token after the first, tokens in the counters."""
    tiny = 'model_name="tiny"'
    before = scrape(server)
    complete(client, max_tokens=5, seed=1)
    list(complete(client, max_tokens=5, seed=1, stream=True))
    after = scrape(server)

    def grew(series: str) -> float:
        return after.get(series, 0.0) - before.get(series, 0.0)

    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert grew(f"vllm:{histogram}_seconds_count{{{tiny}}}") == 2
    assert grew(f"vllm:inter_token_latency_seconds_count{{{tiny}}}") == 2 * 4
    assert grew(f"vllm:generation_tokens_total{{{tiny}}}") == 10
    prompt_tokens = len(server.app.state.models["tiny"].checkpoint.tokenizer.encode(PROMPT))
    assert grew(f"vllm:prompt_tokens_total{{{tiny}}}") == 2 * prompt_tokens
    assert grew(f'vllm:request_success_total{{finish_reason="length",{tiny}}}') == 2
    assert after[f"vllm:num_requests_running{{{tiny}}}"] == 0
    assert after[f"vllm:num_requests_waiting{{{tiny}}}"] == 0
    assert not [
        name
        for name in after
        if name.startswith("lm_") and "rejected" not in name and "failed" not in name
    ]


def test_prefix_cache_hits_are_counted_in_the_metrics(client, server):
    """The same prompt twice: the second request finds its whole blocks cached."""
    tiny = 'model_name="tiny"'
    prompt = "The king speaks of the young poet and her sister "  # within the 64-token context
    before = scrape(server)
    complete(client, prompt=prompt, max_tokens=1, temperature=0)
    middle = scrape(server)
    complete(client, prompt=prompt, max_tokens=1, temperature=0)
    after = scrape(server)
    queries, hits = (f"vllm:prefix_cache_{name}_total{{{tiny}}}" for name in ("queries", "hits"))
    context = len(server.app.state.models["tiny"].checkpoint.tokenizer.encode(prompt)) - 1
    assert after[queries] - middle[queries] == middle[queries] - before[queries] == context
    assert after[hits] - middle[hits] == context // 16 * 16


def test_docs_and_openapi(server):
    docs = httpx.get(f"{server.url}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10)
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert {"/v1/completions", "/v1/models", "/health"} <= set(paths)
    completions = paths["/v1/completions"]["post"]["responses"]
    assert {"application/json", "text/event-stream"} <= set(completions["200"]["content"])
    assert {"400", "401", "404", "413", "429", "503"} <= set(completions)
    assert "503" in paths["/health"]["get"]["responses"]  # while draining


# -- continuous batching --------------------------------------------------------------------

SAMPLED = {"temperature": 1.0, "top_k": 0}


def _prompt(i: int) -> str:
    return ["The king", "A young poet speaks", "We", "Her sister remembers the sea"][i % 4]


def test_batched_http_output_equals_solo(server, client):
    engine = server.app.state.models["tiny"].engine
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], engine.num_running)
            done.wait(0.001)

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            bodies = [
                {
                    "model": "tiny",
                    "prompt": _prompt(i),
                    "max_tokens": 24 + i % 7,
                    "seed": 1000 + i,
                    **SAMPLED,
                }
                for i in range(64)
            ]
            responses = await asyncio.gather(
                *(http.post("/v1/completions", json=b) for b in bodies)
            )
        assert all(r.status_code == 200 for r in responses)
        return [r.json() for r in responses]

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        together = asyncio.run(burst())
    finally:
        done.set()
        watcher.join()
    assert peak[0] > 1, "the 64 requests never shared a batch"
    for i in (0, 1, 2, 3, 17, 63):
        solo = complete(
            client,
            prompt=_prompt(i),
            max_tokens=24 + i % 7,
            seed=1000 + i,
            extra_body={"top_k": 0},
            temperature=1.0,
        )
        assert together[i]["choices"][0]["text"] == solo.choices[0].text, f"request {i}"


def test_engine_batch_equals_solo(tiny_checkpoint_dir):
    ckpt = load_checkpoint(tiny_checkpoint_dir)
    prompts = [ckpt.tokenizer.encode(_prompt(i)) for i in range(64)]

    def params(i: int) -> SamplingParams:
        # Lengths differ (rows leave and move mid-batch); some outgrow the 64-token context.
        return SamplingParams(max_new_tokens=20 + (i * 7) % 61, temperature=1.0, top_k=0, seed=i)

    engine = Engine(ckpt.model, ckpt.tokenizer, max_batch=64)
    together = [engine.submit(prompts[i], params(i)) for i in range(64)]
    engine.run_until_idle()
    for i, seq in enumerate(together):
        alone = Engine(ckpt.model, ckpt.tokenizer, max_batch=1)
        solo = alone.submit(prompts[i], params(i))
        alone.run_until_idle()
        assert seq.generated == solo.generated, f"sequence {i}"
        assert len(seq.generated) == params(i).max_new_tokens


def test_stream_interval_server(start_server):
    """`--stream-interval 3`: fewer, larger events; the same text as without streaming."""
    server = start_server(stream_interval=3)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=24, seed=4, temperature=1.0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = [
        c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices
    ]
    assert "".join(chunks) == whole
    assert len(chunks) <= 24 // 3 + 1


def test_kv_cache_dtype_setting_serves_gpts_and_leaves_recurrent_models_alone(
    tiny_checkpoint_dir, launch
):
    """LM_KV_CACHE_DTYPE picks the GPT's cache precision; a recurrent model served beside it
    (which has no KV cache) starts and answers all the same."""
    import torch

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(checkpoints=[], kv_cache_dtype="float32")
    gpt, lstm = load_checkpoint(tiny_checkpoint_dir), load_checkpoint("shakespeare-char-lstm")
    server = launch(create_app(settings, [gpt, lstm]))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)
    for model in ("tiny", "shakespeare-char-lstm"):
        text = (
            client.completions.create(
                model=model, prompt=PROMPT, max_tokens=8, seed=1, temperature=0.0
            )
            .choices[0]
            .text
        )
        assert len(text) > 0
    models = server.app.state.models
    assert models["tiny"].engine.state["k0"].dtype == torch.float32
    assert "k0" not in models["shakespeare-char-lstm"].engine.state


def test_kv_cache_dtype_setting_is_checked():
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="kv_cache_dtype"):
        Settings(kv_cache_dtype="int4")


def test_decode_matrices_setting_serves_gpts_and_leaves_recurrent_models_alone(
    tiny_checkpoint_dir, launch
):
    """LM_DECODE_MATRICES (--decode-matrices) picks the GPT's decode products: int8 on a CPU
    with AVX512-VNNI, float32 where not; the same greedy text as float32 products here
    (the tiny model's margins are wide); a recurrent model beside it answers all the same."""
    from lm.native import decode
    from service.app import create_app
    from service.settings import Settings

    texts = {}
    for matrices in ("float32", "int8"):
        settings = Settings(checkpoints=[], decode_matrices=matrices)
        gpt = load_checkpoint(tiny_checkpoint_dir)
        lstm = load_checkpoint("shakespeare-char-lstm")
        server = launch(create_app(settings, [gpt, lstm]))
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)
        for model in ("tiny", "shakespeare-char-lstm"):
            texts[matrices, model] = (
                client.completions.create(
                    model=model, prompt=PROMPT, max_tokens=8, seed=1, temperature=0.0
                )
                .choices[0]
                .text
            )
        packed = gpt.model._native_weights()
        if decode.decode_step() is not None:
            want = "int8" if matrices == "int8" and decode.i8_weights() else "float32"
            assert packed.matrices == want
    for model in ("tiny", "shakespeare-char-lstm"):
        assert texts["float32", model] == texts["int8", model] != ""


def test_health_is_503_from_the_signal_on(tiny_checkpoint_dir):
    """`lm serve`'s server marks the app draining when SIGTERM arrives (uvicorn then lets
    running requests finish), so /health answers 503 from that moment."""
    import signal

    import uvicorn

    from service.app import create_app, draining_server
    from service.settings import Settings

    app = create_app(
        Settings(checkpoints=[str(tiny_checkpoint_dir)]), [load_checkpoint(tiny_checkpoint_dir)]
    )

    async def health() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lm") as client:
            return (await client.get("/health")).status_code

    assert asyncio.run(health()) == 200
    server = draining_server(uvicorn.Config(app))
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit
    assert asyncio.run(health()) == 503


# -- outputs on their way to a stream --------------------------------------------------------


class _Seq:
    def __init__(self, name: str, got: list):
        self.name, self.got = name, got

    def sink(self, out) -> None:
        self.got.append((self.name, out))


def test_mailbox_wakes_the_loop_once_for_outputs_that_pile_up():
    """Steps posted while the loop is busy reach it in one delivery, one output per
    sequence with its steps' tokens in order."""
    from lm.engine import Output
    from service.loader import Mailbox

    loop = asyncio.new_event_loop()
    got, deliveries = [], []
    mailbox = Mailbox(loop)
    original = mailbox.deliver
    mailbox.deliver = lambda due: (deliveries.append(len(mailbox.events)), original(due))
    a, b = _Seq("a", got), _Seq("b", got)
    try:
        for step in range(3):  # the loop is not running: it is "behind"
            mailbox.post([(a, Output(str(step), [step], None)), (b, Output(str(step), [], None))])
        loop.call_soon(loop.stop)
        loop.run_forever()
        mailbox.post([(a, Output("3", [3], None))])
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        loop.close()
    assert deliveries == [6, 1]
    # One output per sequence and delivery: its steps' tokens merged, in order.
    assert [(n, out.text, out.token_ids) for n, out in got] == [
        ("a", "012", [0, 1, 2]),
        ("b", "012", []),
        ("a", "3", [3]),
    ]
    with pytest.raises(RuntimeError):  # a closed loop: an error, and nothing kept
        mailbox.post([(a, Output("4", [4], None))])
    assert mailbox.events == []


def test_mailbox_paces_deliveries_but_sends_first_tokens_at_once():
    """With an interval, outputs wait for the next delivery, unless one is a first token."""
    import time

    from lm.engine import Output
    from service.loader import Mailbox

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    got = []
    mailbox = Mailbox(loop, interval=1.0)
    a, b = _Seq("a", got), _Seq("b", got)

    def texts():
        time.sleep(0.3)
        return [out.text for _, out in got]

    try:
        mailbox.post([(a, Output("1", [1], None, first=True))])
        assert texts() == ["1"]
        mailbox.post([(a, Output("2", [2], None))])  # within the interval: waits
        mailbox.post([(a, Output("3", [3], None))])
        assert texts() == ["1"]
        mailbox.post([(b, Output("x", [9], None, first=True))])  # at once, with the rest
        assert texts() == ["1", "23", "x"]
        mailbox.post([(b, Output("y", [8], None))])
        assert texts() == ["1", "23", "x"]
        deadline = time.monotonic() + 5
        while len(got) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [out.text for _, out in got] == ["1", "23", "x", "y"]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join()
        loop.close()


def test_mailbox_chunk_rate_paces_by_the_number_of_streams():
    """With a chunk rate, a post of n streams' outputs waits n / rate seconds: two streams
    at 2 chunks/s wait a second, one stream at 1,000 chunks/s a millisecond."""
    import time

    from lm.engine import Output
    from service.loader import Mailbox

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    got = []
    a, b = _Seq("a", got), _Seq("b", got)

    def wait_for(count: int, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        while len(got) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return [out.text for _, out in got]

    try:
        slow = Mailbox(loop, chunk_rate=2.0)
        slow.post(
            [(a, Output("1", [1], None, first=True)), (b, Output("x", [9], None, first=True))]
        )
        assert wait_for(2, 5) == ["1", "x"]
        slow.post([(a, Output("2", [2], None)), (b, Output("y", [8], None))])
        time.sleep(0.3)
        assert len(got) == 2  # waits about a second after the last delivery
        assert wait_for(4, 5) == ["1", "x", "2", "y"]
        got.clear()
        fast = Mailbox(loop, chunk_rate=1000.0)
        fast.post([(a, Output("3", [3], None))])
        fast.post([(a, Output("4", [4], None))])
        deadline = time.monotonic() + 0.3
        while "".join(out.text for _, out in got) != "34" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "".join(out.text for _, out in got) == "34"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join()
        loop.close()


def test_outputs_that_arrive_together_go_out_as_one_event_per_choice():
    from lm.engine import Output
    from service.jobs import _by_choice

    batch = [
        (0, Output("a", [1], [-0.5], top_logprobs=[[(1, -0.5)]])),
        (1, Output("x", [7], [-0.1], top_logprobs=[[(7, -0.1)]])),
        (0, Output("bc", [2, 3], [-1.0, -2.0], top_logprobs=[[(2, -1.0)], [(3, -2.0)]])),
        (0, Output("", [], [], finish_reason="length", top_logprobs=[], timings={"e2e": 1.0})),
    ]
    merged = dict(_by_choice(batch))
    assert list(merged) == [0, 1]
    first = merged[0]
    assert (first.text, first.token_ids, first.logprobs) == ("abc", [1, 2, 3], [-0.5, -1.0, -2.0])
    assert first.top_logprobs == [[(1, -0.5)], [(2, -1.0)], [(3, -2.0)]]
    assert (first.finish_reason, first.timings) == ("length", {"e2e": 1.0})
    assert merged[1] is batch[1][1]
    assert _by_choice(batch[:1]) == batch[:1]
