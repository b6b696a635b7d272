"""The engine: determinism, batch independence, stops, streaming, sliding window,
cancellation, admission, limits, logprobs and the background thread (tiny untrained models)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lm.engine import Engine, EngineStopped, Output, QueueFull, Sequence
from lm.errors import LMError
from lm.models import ModelConfig, build_model
from lm.sampling import SamplingParams
from lm.tokenizers import BPETokenizer, CharTokenizer

PROMPTS = ["The king speaks of ", "A young poet", "We defend", "Her sister remembers the "]

MIXED_PARAMS = [
    dict(temperature=0.0),
    dict(temperature=0.8, top_k=5, seed=11),
    dict(temperature=1.2, top_p=0.9, seed=12),
    dict(temperature=0.5, seed=13),
    dict(temperature=1.0, top_k=3, top_p=0.8, seed=14),
    dict(temperature=2.0, seed=15),
    dict(temperature=1.5, min_p=0.2, seed=16),
    dict(temperature=1.0, min_p=0.05, top_k=4, seed=17),
    dict(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5),
    dict(temperature=0.9, repetition_penalty=1.8, seed=18),
    dict(temperature=0.7, logit_bias={3: 4.0, 5: -100.0}, presence_penalty=-1.0, seed=19),
]


def tiny_model(kind: str, vocab_size: int, block_size: int = 64, seed: int = 0) -> torch.nn.Module:
    """An untrained model with large random weights, so that its predictions vary."""
    torch.manual_seed(seed)
    config = ModelConfig(
        kind=kind, vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=2, block_size=block_size
    )
    model = build_model(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def char_tokenizer(corpus_text) -> CharTokenizer:
    return CharTokenizer.train(corpus_text)


@pytest.fixture(scope="module")
def bpe_tokenizer(corpus_text) -> BPETokenizer:
    return BPETokenizer.train(corpus_text, vocab_size=300)


@pytest.fixture(scope="module", params=["gpt", "lstm"])
def model(request, char_tokenizer):
    return tiny_model(request.param, char_tokenizer.vocab_size)


@pytest.fixture(scope="module")
def gpt(char_tokenizer):
    return tiny_model("gpt", char_tokenizer.vocab_size)


def run_one(
    model, tokenizer, prompt: str, stream: bool = False, kv_cache_dtype: str = "auto", **params
) -> Sequence:
    """Generate for one request alone in its engine; outputs collected on the sequence."""
    engine = Engine(model, tokenizer, max_batch=4, kv_cache_dtype=kv_cache_dtype)
    seq = engine.submit(tokenizer.encode(prompt), SamplingParams(**params), stream=stream)
    engine.run_until_idle()
    return seq


def text_of(seq: Sequence) -> str:
    return "".join(out.text for out in seq.outputs)


# -- determinism and batching ----------------------------------------------------------------


def test_same_seed_same_tokens_and_different_seeds_differ(model, char_tokenizer):
    first = run_one(model, char_tokenizer, PROMPTS[0], max_new_tokens=30, seed=7)
    again = run_one(model, char_tokenizer, PROMPTS[0], max_new_tokens=30, seed=7)
    other = run_one(model, char_tokenizer, PROMPTS[0], max_new_tokens=30, seed=8)
    assert first.generated == again.generated
    assert text_of(first) == text_of(again)
    assert first.generated != other.generated


def test_a_request_is_the_same_alone_and_in_a_mixed_batch(model, char_tokenizer):
    requests = [
        (PROMPTS[i % len(PROMPTS)], dict(max_new_tokens=20 + 3 * i, **params))
        for i, params in enumerate(MIXED_PARAMS)
    ]
    alone = [
        run_one(model, char_tokenizer, prompt, **params).generated for prompt, params in requests
    ]

    engine = Engine(model, char_tokenizer, max_batch=8)
    seqs = [engine.submit(char_tokenizer.encode(p), SamplingParams(**kw)) for p, kw in requests]
    engine.run_until_idle()
    assert [seq.generated for seq in seqs] == alone

    # Continuous batching: half join while the others are already decoding.
    engine = Engine(model, char_tokenizer, max_batch=8)
    seqs = [engine.submit(char_tokenizer.encode(p), SamplingParams(**kw)) for p, kw in requests[:3]]
    for _ in range(5):
        engine.step()
    seqs += [
        engine.submit(char_tokenizer.encode(p), SamplingParams(**kw)) for p, kw in requests[3:]
    ]
    engine.run_until_idle()
    assert [seq.generated for seq in seqs] == alone


def test_max_new_tokens_and_finish_reason_length(model, char_tokenizer):
    for max_new_tokens in (1, 2, 17):
        seq = run_one(model, char_tokenizer, PROMPTS[1], max_new_tokens=max_new_tokens, seed=3)
        assert len(seq.generated) == max_new_tokens
        assert seq.finish_reason == "length"
        assert len(seq.outputs) == 1  # not streaming: one output at the end
        out = seq.outputs[0]
        assert out.finish_reason == "length"
        assert out.token_ids == seq.generated
        assert out.text == char_tokenizer.decode(seq.generated)
        assert out.timings["completion_tokens"] == max_new_tokens
        assert out.timings["prompt_tokens"] == len(PROMPTS[1])


def test_empty_prompt_ids_are_refused(gpt, char_tokenizer):
    engine = Engine(gpt, char_tokenizer)
    with pytest.raises(LMError, match="at least one token"):
        engine.submit([], SamplingParams())


# -- stop sequences and streaming ----------------------------------------------------------


def greedy_text(model, tokenizer, prompt: str, n: int = 60) -> str:
    return text_of(run_one(model, tokenizer, prompt, max_new_tokens=n, temperature=0.0))


def multi_char_stop(text: str, length: int = 3) -> tuple[str, int]:
    """A substring of `text` (so spanning several char tokens) whose first occurrence is
    well inside the text, and that occurrence's index."""
    for start in range(8, len(text) - length):
        stop = text[start : start + length]
        if text.find(stop) == start:
            return stop, start
    raise AssertionError(f"no usable stop sequence in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_spanning_tokens_is_cut_from_the_output(gpt, char_tokenizer, stream):
    full = greedy_text(gpt, char_tokenizer, PROMPTS[0])
    stop, index = multi_char_stop(full)
    seq = run_one(
        gpt,
        char_tokenizer,
        PROMPTS[0],
        stream=stream,
        max_new_tokens=60,
        temperature=0.0,
        stop=["never in the text", stop],
    )
    assert seq.finish_reason == "stop"
    assert text_of(seq) == full[:index]
    assert stop not in text_of(seq)
    assert len(seq.generated) == index + len(stop)  # stopped on the token that completed it
    assert [out.finish_reason for out in seq.outputs] == [None] * (len(seq.outputs) - 1) + ["stop"]
    if stream:
        assert len(seq.outputs) > 3


def test_stop_sequence_straddling_bpe_tokens(bpe_tokenizer):
    model = tiny_model("gpt", bpe_tokenizer.vocab_size)
    prompt = PROMPTS[2]
    plain = run_one(model, bpe_tokenizer, prompt, stream=True, max_new_tokens=60, seed=1)
    text = text_of(plain)
    # Streamed one token at a time, each output's text is that token's; take the characters
    # either side of a boundary between two tokens of valid text (an untrained model also
    # makes stray bytes), where that stop first occurs.
    stop = index = None
    end = 0
    for left, right in zip(plain.outputs, plain.outputs[1:]):
        end += len(left.text)
        if len(left.token_ids) == len(right.token_ids) == 1 and left.text and right.text:
            candidate = left.text[-2:] + right.text[:2]
            if "\ufffd" not in candidate and text.find(candidate) == end - len(left.text[-2:]):
                stop, index = candidate, end - len(left.text[-2:])
                break
    assert stop is not None, f"no clean token boundary in {text!r}"
    assert len(stop) >= 2
    for stream in (False, True):
        seq = run_one(
            model, bpe_tokenizer, prompt, stream=stream, max_new_tokens=60, seed=1, stop=[stop]
        )
        assert seq.finish_reason == "stop"
        assert text_of(seq) == text[:index]
        assert seq.generated == plain.generated[: len(seq.generated)]


def test_streaming_joins_to_the_non_streaming_text(model, char_tokenizer):
    for params in MIXED_PARAMS[:3]:
        whole = run_one(model, char_tokenizer, PROMPTS[3], max_new_tokens=40, **params)
        pieces = run_one(
            model, char_tokenizer, PROMPTS[3], stream=True, max_new_tokens=40, **params
        )
        assert len(pieces.outputs) > 1
        assert text_of(pieces) == text_of(whole)
        assert [t for out in pieces.outputs for t in out.token_ids] == whole.generated


def test_streaming_holds_back_a_partial_stop_and_releases_it(gpt, char_tokenizer):
    """A tail that may begin a stop sequence is held until it cannot; the stream then
    carries on, and joins to the same text as without the stop."""
    full = greedy_text(gpt, char_tokenizer, PROMPTS[0], n=50)
    char = full[10]
    assert full.count(char) >= 2
    stop = char + "\x00"  # its first character appears, the whole never does
    sent: list[str] = []
    engine = Engine(gpt, char_tokenizer)
    seq = engine.submit(
        char_tokenizer.encode(PROMPTS[0]),
        SamplingParams(max_new_tokens=50, temperature=0.0, stop=[stop]),
        sink=lambda out: sent.append(out.text),
        stream=True,
    )
    held_back = 0
    while not seq.finished:
        engine.step()
        assert seq.text.startswith("".join(sent))
        held = seq.text[len("".join(sent)) :]
        if not seq.finished:  # exactly the tail that could begin the stop is held back
            assert held == (char if seq.text.endswith(char) else "")
            held_back += held == char
    assert held_back >= 2
    assert seq.finish_reason == "length"
    assert "".join(sent) == full


def test_streaming_never_sends_what_turns_into_the_stop(gpt, char_tokenizer):
    full = greedy_text(gpt, char_tokenizer, PROMPTS[0])
    stop, index = multi_char_stop(full, length=4)
    sent: list[str] = []
    engine = Engine(gpt, char_tokenizer)
    seq = engine.submit(
        char_tokenizer.encode(PROMPTS[0]),
        SamplingParams(max_new_tokens=60, temperature=0.0, stop=[stop]),
        sink=lambda out: sent.append(out.text),
        stream=True,
    )
    while not seq.finished:
        engine.step()
        assert full[:index].startswith("".join(sent))  # never anything past the cut
    assert "".join(sent) == full[:index]


def test_stops_completed_by_one_token_cut_at_the_earliest(char_tokenizer):
    """A multi-character token can complete several stops at once; the output must end
    before the earliest of them, whatever their order in the list."""

    class PiecesTokenizer:  # what the decoder needs: ids -> text
        pieces = ["", "x", "abc", "q"]

        def decode(self, ids):
            return "".join(self.pieces[i] for i in ids)

    for stops in (["bc", "a"], ["a", "bc"], ["c", "xa"]):
        seq = Sequence([3], SamplingParams(stop=stops), PiecesTokenizer(), None, stream=False)
        assert seq.add_token(1, None, None, 0.0) is None
        out = seq.add_token(2, None, None, 0.0)
        expected = "" if "xa" in stops else "x"
        assert (out.text, out.finish_reason) == (expected, "stop")


# -- the sliding window --------------------------------------------------------------------


@torch.no_grad()
def test_gpt_keeps_going_past_its_context(char_tokenizer):
    block = 16
    model = tiny_model("gpt", char_tokenizer.vocab_size, block_size=block)
    prompt = char_tokenizer.encode("The old sailor walks toward the win")  # 35 tokens
    prompt = (prompt + prompt)[:40]
    # A float32 cache: greedy tokens are compared with `forward`'s argmax below.
    engine = Engine(model, char_tokenizer, max_batch=2, kv_cache_dtype="float32")
    greedy = engine.submit(prompt, SamplingParams(max_new_tokens=100, temperature=0.0))
    sampled = engine.submit(prompt, SamplingParams(max_new_tokens=100, seed=5))
    engine.run_until_idle()
    assert len(greedy.generated) == len(sampled.generated) == 100
    assert greedy.finish_reason == sampled.finish_reason == "length"
    again = run_one(
        model,
        char_tokenizer,
        char_tokenizer.decode(prompt),
        max_new_tokens=100,
        seed=5,
        kv_cache_dtype="float32",
    )
    assert again.generated == sampled.generated

    # Each greedy token is the argmax of `forward` over the tokens in the window: the engine
    # re-prefills the newest half block whenever the next token would not fit.
    history, cached = list(prompt), None
    for token in greedy.generated:
        if cached is None or cached + 1 > block:
            cached = min(len(history) - 1, block // 2)
        window = history[-(cached + 1) :]
        assert len(window) <= block
        expected = model(torch.tensor([window]))[0, -1].argmax().item()
        assert token == expected
        history.append(token)
        cached += 1


@torch.no_grad()
def test_gpt_tokens_before_the_window_fills_use_the_whole_history(char_tokenizer):
    block = 16
    model = tiny_model("gpt", char_tokenizer.vocab_size, block_size=block, seed=1)
    prompt = char_tokenizer.encode("We remember")  # 11 tokens: 5 more fit in the context
    seq = run_one(
        model,
        char_tokenizer,
        char_tokenizer.decode(prompt),
        max_new_tokens=30,
        temperature=0.0,
        kv_cache_dtype="float32",
    )  # compared with `forward` below
    history = list(prompt)
    while len(history) < block:
        token = model(torch.tensor([history]))[0, -1].argmax().item()
        assert seq.generated[len(history) - len(prompt)] == token
        history.append(token)
    assert len(seq.generated) == 30


def test_gpt_with_a_one_token_context(char_tokenizer):
    model = tiny_model("gpt", char_tokenizer.vocab_size, block_size=1)
    seq = run_one(model, char_tokenizer, "The king", max_new_tokens=10, seed=0)
    assert len(seq.generated) == 10


# -- cancellation, admission, limits ---------------------------------------------------------


def test_cancel_finishes_at_the_next_step_and_frees_the_slot(model, char_tokenizer):
    alone = [
        run_one(model, char_tokenizer, p, max_new_tokens=30, seed=i).generated
        for i, p in enumerate(PROMPTS[:3])
    ]
    engine = Engine(model, char_tokenizer, max_batch=4)
    seqs = [
        engine.submit(char_tokenizer.encode(p), SamplingParams(max_new_tokens=30, seed=i))
        for i, p in enumerate(PROMPTS[:3])
    ]
    for _ in range(5):
        engine.step()
    assert engine.num_running == 3
    seqs[0].cancel()  # row 0: the last row moves into its slot
    engine.step()
    assert seqs[0].finish_reason == "cancelled"
    assert len(seqs[0].generated) == 5
    assert engine.num_running == 2
    assert seqs[0].outputs[-1].finish_reason == "cancelled"
    assert seqs[0].outputs[-1].text == char_tokenizer.decode(seqs[0].generated)
    engine.run_until_idle()
    assert engine.num_running == 0
    assert [s.generated for s in seqs[1:]] == alone[1:]  # undisturbed by the move


def test_cancel_while_waiting(gpt, char_tokenizer):
    engine = Engine(gpt, char_tokenizer, max_batch=1)
    running = engine.submit(char_tokenizer.encode("We"), SamplingParams(max_new_tokens=5))
    waiting = engine.submit(char_tokenizer.encode("We"), SamplingParams(max_new_tokens=5))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    waiting.cancel()
    engine.run_until_idle()
    assert running.finish_reason == "length"
    assert waiting.finish_reason == "cancelled"
    assert waiting.generated == []


def test_more_requests_than_slots_all_complete_in_fifo_order(model, char_tokenizer):
    lengths = [12, 3, 8, 1, 6, 9, 2]
    alone = [
        run_one(model, char_tokenizer, PROMPTS[i % 4], max_new_tokens=n, seed=i).generated
        for i, n in enumerate(lengths)
    ]
    engine = Engine(model, char_tokenizer, max_batch=2)
    seqs = [
        engine.submit(
            char_tokenizer.encode(PROMPTS[i % 4]), SamplingParams(max_new_tokens=n, seed=i)
        )
        for i, n in enumerate(lengths)
    ]
    admitted: list[int] = []
    while engine.has_work():
        engine.step()
        assert engine.num_running <= 2
        admitted += [i for i, s in enumerate(seqs) if s.admitted_at and i not in admitted]
    assert admitted == list(range(len(lengths)))
    assert [s.admitted_at for s in seqs] == sorted(s.admitted_at for s in seqs)
    assert [s.finish_reason for s in seqs] == ["length"] * len(lengths)
    assert [s.generated for s in seqs] == alone


def test_queue_full(gpt, char_tokenizer):
    engine = Engine(gpt, char_tokenizer, max_batch=1, max_queue=2)
    ids = char_tokenizer.encode("We")
    engine.submit(ids, SamplingParams(max_new_tokens=2))
    engine.submit(ids, SamplingParams(max_new_tokens=2))
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(ids, SamplingParams(max_new_tokens=2))
    assert issubclass(QueueFull, LMError)
    engine.step()  # admits one: room in the queue again
    engine.submit(ids, SamplingParams(max_new_tokens=2))
    engine.run_until_idle()
    assert not engine.has_work()


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=float("nan")),
        dict(top_k=-1),
        dict(max_new_tokens=0),
        dict(max_new_tokens=-3),
        dict(stop=[""]),
        dict(stop=["a", ""]),
        dict(stop=[str(i) for i in range(17)]),
        dict(logprobs=-1),
        dict(logprobs=6),
    ],
)
def test_bad_sampling_params_are_refused(bad, gpt, char_tokenizer):
    params = SamplingParams(**bad)
    with pytest.raises(LMError):
        params.validate()
    engine = Engine(gpt, char_tokenizer)
    with pytest.raises(LMError):
        engine.submit(char_tokenizer.encode("We"), params)
    assert engine.num_waiting == 0


def test_good_edge_sampling_params_are_accepted():
    for good in (
        dict(temperature=0.0),
        dict(top_p=1.0),
        dict(top_k=0),
        dict(top_k=10**30),
        dict(max_new_tokens=1),
        dict(stop=[str(i) for i in range(16)]),
        dict(logprobs=0),
        dict(logprobs=5),
    ):
        SamplingParams(**good).validate()


def test_huge_top_k_is_no_limit(gpt, char_tokenizer):
    huge = run_one(gpt, char_tokenizer, "We", max_new_tokens=15, seed=2, top_k=10**30)
    off = run_one(gpt, char_tokenizer, "We", max_new_tokens=15, seed=2, top_k=0)
    assert huge.generated == off.generated


# -- logprobs --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_for_every_token(gpt, char_tokenizer, stream):
    engine = Engine(gpt, char_tokenizer)
    ids = char_tokenizer.encode(PROMPTS[0])
    two = engine.submit(ids, SamplingParams(max_new_tokens=12, seed=1, logprobs=2), stream=stream)
    greedy = engine.submit(
        ids, SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=2), stream=stream
    )
    zero = engine.submit(ids, SamplingParams(max_new_tokens=12, seed=1, logprobs=0), stream=stream)
    none = engine.submit(ids, SamplingParams(max_new_tokens=12, seed=1), stream=stream)
    engine.run_until_idle()
    for seq in (two, greedy, zero):
        logprobs = [lp for out in seq.outputs for lp in out.logprobs]
        top = [t for out in seq.outputs for t in out.top_logprobs]
        assert len(logprobs) == len(top) == len(seq.generated) == 12
        assert all(lp <= 0 for lp in logprobs)
        size = seq.params.logprobs
        assert all(len(entries) == size for entries in top)
        for entries in top:
            values = [value for _, value in entries]
            assert values == sorted(values, reverse=True)
    for token, lp, entries in zip(greedy.generated, greedy.logprobs, greedy.top_logprobs):
        assert entries[0][0] == token
        assert entries[0][1] == pytest.approx(lp)
    for token, lp, entries in zip(two.generated, two.logprobs, two.top_logprobs):
        assert token == entries[0][0] or lp <= entries[0][1] + 1e-6
    assert all(out.logprobs is None and out.top_logprobs is None for out in none.outputs)
    assert none.generated == zero.generated == two.generated  # logprobs change no draw


# -- the background thread -------------------------------------------------------------------


def test_background_thread_serves_requests_from_other_threads(gpt, char_tokenizer):
    params = dict(max_new_tokens=25, temperature=0.9, top_k=8, seed=21)
    expected = run_one(gpt, char_tokenizer, PROMPTS[1], **params)
    engine = Engine(gpt, char_tokenizer)
    engine.start()
    try:
        received: list[Output] = []
        done = threading.Event()

        def sink(out: Output) -> None:
            received.append(out)
            if out.finish_reason is not None:
                done.set()

        client = threading.Thread(
            target=lambda: engine.submit(
                char_tokenizer.encode(PROMPTS[1]), SamplingParams(**params), sink, stream=True
            )
        )
        client.start()
        client.join(timeout=10)
        assert done.wait(timeout=20)
        assert "".join(out.text for out in received) == text_of(expected)
        assert received[-1].finish_reason == "length"
    finally:
        engine.shutdown(timeout=5)
    with pytest.raises(EngineStopped):
        engine.submit(char_tokenizer.encode("We"), SamplingParams())


def test_shutdown_cancels_what_does_not_finish_in_time(gpt, char_tokenizer):
    engine = Engine(gpt, char_tokenizer)
    done = threading.Event()
    reasons: list[str] = []

    def sink(out: Output) -> None:
        if out.finish_reason is not None:
            reasons.append(out.finish_reason)
            done.set()

    engine.start()
    seq = engine.submit(char_tokenizer.encode("We"), SamplingParams(max_new_tokens=100_000), sink)
    deadline = time.monotonic() + 10
    while not seq.generated and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    engine.shutdown(timeout=0.2)
    assert time.monotonic() - started < 5
    assert done.wait(timeout=5)
    assert reasons == ["cancelled"]
    assert 0 < len(seq.generated) < 100_000


# -- KV cache precision ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_dtype, cache_dtype, agree",
    [
        ("float32", "bfloat16", 4),
        ("float32", "float16", 4),
        ("float32", "int8", 3),
        ("bfloat16", "auto", 3),
    ],
)
def test_narrower_precision_keeps_requests_batch_independent(
    gpt, char_tokenizer, model_dtype, cache_dtype, agree
):
    """A bfloat16/float16/int8 KV cache, or a whole model cast to bfloat16, changes the
    numbers a little, never what batch a request ran in."""
    import copy

    model = copy.deepcopy(gpt).to(getattr(torch, model_dtype))
    expected = model_dtype if cache_dtype == "auto" else cache_dtype
    requests = [
        (PROMPTS[i % len(PROMPTS)], dict(max_new_tokens=24 + 2 * i, **params))
        for i, params in enumerate(MIXED_PARAMS)
    ]

    def generate(batch: list) -> list[list[int]]:
        engine = Engine(model, char_tokenizer, max_batch=8, kv_cache_dtype=cache_dtype)
        assert engine.state["k0"].dtype == engine.state["v0"].dtype == getattr(torch, expected)
        seqs = [engine.submit(char_tokenizer.encode(p), SamplingParams(**kw)) for p, kw in batch]
        engine.run_until_idle()
        return [seq.generated for seq in seqs]

    alone = [generate([request])[0] for request in requests]
    assert generate(requests) == alone
    # Greedy text stays close to float32's: the first tokens agree.
    full = run_one(
        gpt, char_tokenizer, PROMPTS[0], max_new_tokens=8, temperature=0.0, kv_cache_dtype="float32"
    )
    narrow = generate([(PROMPTS[0], dict(max_new_tokens=8, temperature=0.0))])[0]
    assert narrow[:agree] == full.generated[:agree]


def test_kv_cache_dtype_is_checked(gpt, char_tokenizer):
    with pytest.raises(LMError, match="kv_cache_dtype must be one of"):
        Engine(gpt, char_tokenizer, kv_cache_dtype="int4")
    lstm = tiny_model("lstm", char_tokenizer.vocab_size)
    with pytest.raises(LMError, match="GPT models only"):
        Engine(lstm, char_tokenizer, kv_cache_dtype="bfloat16")
    assert Engine(lstm, char_tokenizer, kv_cache_dtype="auto").state  # the default fits all


def test_stream_interval_sends_several_tokens_per_output(gpt, char_tokenizer):
    params = dict(max_new_tokens=30, temperature=0.9, seed=3)
    whole = run_one(gpt, char_tokenizer, PROMPTS[0], **params)
    engine = Engine(gpt, char_tokenizer, stream_interval=4)
    seq = engine.submit(char_tokenizer.encode(PROMPTS[0]), SamplingParams(**params), stream=True)
    engine.run_until_idle()
    sizes = [len(out.token_ids) for out in seq.outputs]
    assert sum(sizes) == 30 and all(size >= 4 for size in sizes[:-1])
    assert len(sizes) <= 8  # 30 tokens in outputs of 4: at most 7, and the finish
    assert text_of(seq) == text_of(whole)
    with pytest.raises(LMError, match="stream_interval"):
        Engine(gpt, char_tokenizer, stream_interval=0)


# -- prefill budget per step -------------------------------------------------------------------


def _generate_all(model, tokenizer, prompts: list[str], **params) -> tuple[list, Engine]:
    engine = Engine(model, tokenizer, max_batch=8, kv_cache_dtype="float32")
    seqs = [
        engine.submit(tokenizer.encode(p), SamplingParams(seed=i, **params))
        for i, p in enumerate(prompts)
    ]
    engine.run_until_idle()
    return [s.generated for s in seqs], engine


def test_admissions_take_at_most_the_prefill_budget_per_step(monkeypatch, char_tokenizer):
    model = tiny_model("gpt", char_tokenizer.vocab_size)
    prompts = ["abcdefgh", "ijklmnop", "qrstuvwx", "yz"]  # contexts of 7, 7, 7 and 1 tokens
    expected, _ = _generate_all(model, char_tokenizer, prompts, max_new_tokens=12)
    monkeypatch.setattr("lm.engine.PREFILL_TOKENS", 10)
    engine = Engine(model, char_tokenizer, max_batch=8, kv_cache_dtype="float32")
    seqs = [
        engine.submit(char_tokenizer.encode(p), SamplingParams(seed=i, max_new_tokens=12))
        for i, p in enumerate(prompts)
    ]
    admitted = []
    while engine.has_work():
        engine.step()
        admitted.append(len(engine.active) + sum(s.finished for s in seqs))
    assert admitted[:3] == [1, 2, 4]  # 7 | 7 | 7 + 1 tokens: one step's budget each
    assert [s.generated for s in seqs] == expected  # only the timing changed


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_prefills_of_different_lengths_share_a_batch_when_padding_is_small(
    kind, monkeypatch, char_tokenizer
):
    """A GPT prefills rows of 70 and 90 tokens as one batch (each padded at its end) and
    its texts stay those of rows run alone; 50 tokens do not go with 4 and 5 (too much
    padding), nor rows under the model's bfloat16 threshold (64 tokens) with longer ones; a
    recurrent model's rows only go with rows of their own length."""
    model = tiny_model(kind, char_tokenizer.vocab_size, block_size=128)
    contexts = [70, 5, 50, 4, 90]
    prompts = [("The king speaks of " * 5)[: n + 1] for n in contexts]
    alone = [
        run_one(model, char_tokenizer, p, seed=i, max_new_tokens=8).generated
        for i, p in enumerate(prompts)
    ]
    engine = Engine(model, char_tokenizer, max_batch=8, prefix_cache_mb=0)
    widths = []
    original = engine._prefill
    monkeypatch.setattr(
        engine,
        "_prefill",
        lambda group: (widths.append(sorted(len(c) for _, c, _ in group)), original(group)),
    )
    seqs = [
        engine.submit(char_tokenizer.encode(p), SamplingParams(seed=i, max_new_tokens=8))
        for i, p in enumerate(prompts)
    ]
    engine.run_until_idle()
    assert [s.generated for s in seqs] == alone
    if kind == "gpt":
        assert model.bf16_prefill_tokens == 64
        assert widths == [[4, 5], [50], [70, 90]]
    else:
        assert sorted(widths) == [[4], [5], [50], [70], [90]]


def test_context_shifts_beyond_the_budget_wait_a_step(monkeypatch, char_tokenizer):
    """Four rows reach the end of a 16-token context in the same step; with room for one
    shift per step, three sit out a step or more, and every text stays the same."""
    model = tiny_model("gpt", char_tokenizer.vocab_size, block_size=16)
    prompts = ["The king speaks", "A young poet is", "We defend the w", "Her sister reme"]
    expected, free = _generate_all(model, char_tokenizer, prompts, max_new_tokens=30)
    monkeypatch.setattr("lm.engine.PREFILL_TOKENS", 8)  # one shift (8 tokens) per step
    got, budgeted = _generate_all(model, char_tokenizer, prompts, max_new_tokens=30)
    assert got == expected
    assert budgeted.steps > free.steps


def test_penalties_and_bias_change_only_their_own_rows(gpt, char_tokenizer):
    plain = run_one(gpt, char_tokenizer, PROMPTS[0], max_new_tokens=40, temperature=0.0)
    banned = plain.generated[0]
    biased = run_one(
        gpt,
        char_tokenizer,
        PROMPTS[0],
        max_new_tokens=40,
        temperature=0.0,
        logit_bias={banned: -100.0},
    )
    assert banned not in biased.generated
    repeated = run_one(
        gpt, char_tokenizer, PROMPTS[0], max_new_tokens=40, temperature=0.0, frequency_penalty=2.0
    )
    assert repeated.generated != plain.generated


# -- non-finite logits ---------------------------------------------------------------------


def poison(model: torch.nn.Module, token: int) -> torch.nn.Module:
    """`model` with the input embedding of `token` set to NaN (the output layer untied and
    kept finite): every sequence whose prompt holds `token` gets NaN logits, no other."""
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.wte.weight.detach().clone())
        model.wte.weight[token] = float("nan")
    return model


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
@pytest.mark.parametrize("stream", [False, True])
def test_nonfinite_logits_fail_only_their_request(kind, stream, char_tokenizer):
    token = char_tokenizer.encode("?")[0]
    clean = tiny_model(kind, char_tokenizer.vocab_size)
    poisoned = poison(tiny_model(kind, char_tokenizer.vocab_size), token)
    requests = [
        ("The king speaks of ", dict(max_new_tokens=30, temperature=0.0)),
        ("Who goes there? ", dict(max_new_tokens=30, seed=3)),
        ("A young poet", dict(max_new_tokens=25, temperature=0.8, seed=5)),
        ("We defend", dict(max_new_tokens=20, top_k=5, seed=7)),
    ]
    expected = [run_one(clean, char_tokenizer, p, **kw).generated for p, kw in requests]

    engine = Engine(poisoned, char_tokenizer, max_batch=4)
    seqs = [
        engine.submit(char_tokenizer.encode(p), SamplingParams(**kw), stream=stream)
        for p, kw in requests
    ]
    engine.run_until_idle()

    bad = seqs[1]
    assert bad.finish_reason == "error" and bad.generated == []
    assert bad.outputs[-1].finish_reason == "error"
    assert bad.outputs[-1].error.code == "nonfinite_logits"
    assert "not finite (NaN or infinite logits) at generated token 1" in bad.error.message
    assert engine.nonfinite_rows == 1
    for seq, want in zip([seqs[0], *seqs[2:]], [expected[0], *expected[2:]]):
        assert seq.finish_reason == "length" and seq.error is None
        assert seq.generated == want  # the healthy rows are untouched by their neighbour


def test_nonfinite_check_is_one_vectorised_pass(gpt, char_tokenizer):
    """Finite logits are left as they are; broken rows are named and zeroed in place."""
    from lm.engine import _nonfinite_rows

    logits = torch.randn(5, 7)
    assert _nonfinite_rows(logits.clone()) == set()
    logits[1, 3], logits[4, 0] = float("nan"), float("-inf")
    before = logits.clone()
    assert _nonfinite_rows(logits) == {1, 4}
    assert torch.equal(logits[[0, 2, 3]], before[[0, 2, 3]])
    assert not logits[[1, 4]].any()


def test_a_failing_step_fails_the_running_requests_saying_so(char_tokenizer, monkeypatch):
    model = tiny_model("gpt", char_tokenizer.vocab_size)

    def broken_step(*args):
        raise RuntimeError("a bug in a model step")

    monkeypatch.setattr(model, "step", broken_step)
    engine = Engine(model, char_tokenizer, max_batch=2)
    done = threading.Event()
    finals: list[Output] = []

    def sink(out: Output) -> None:
        if out.finish_reason is not None:
            finals.append(out)
            if len(finals) == 2:
                done.set()

    for prompt in PROMPTS[:2]:
        engine.submit(char_tokenizer.encode(prompt), SamplingParams(max_new_tokens=5), sink)
    engine.start()
    try:
        assert done.wait(10)
    finally:
        engine.shutdown(timeout=0)
    assert [(o.finish_reason, o.error.code) for o in finals] == [("error", "engine_error")] * 2


def test_huge_finite_logits_are_not_taken_for_nonfinite():
    from lm.engine import _nonfinite_rows

    logits = torch.full((2, 4), 3e38)  # each row's sum overflows to inf; every logit is finite
    assert _nonfinite_rows(logits) == set()
    assert torch.equal(logits, torch.full((2, 4), 3e38))


@pytest.mark.parametrize("cached", [False, True], ids=["empty-rows", "cached-prefix"])
def test_padded_prefill_writes_each_row_as_alone(char_tokenizer, cached):
    """Prompts of different lengths prefilled as one padded batch leave every row's keys and
    values bit for bit as that prompt prefilled alone: each row attends over its own
    tokens only (the fused causal kernel's numbers depend on the padded length otherwise),
    with and without a cached shared prefix."""
    model = tiny_model("gpt", char_tokenizer.vocab_size)
    shared = "The king speaks of the quiet sea. " if cached else ""
    prompts = [shared + p for p in ("ROMEO:\n", "First Citizen:\nWe are", "KING HENRY", "To be")]

    def prefilled(texts, max_batch):
        # A float32 cache: a last-bit difference would mostly round away in bfloat16.
        engine = Engine(model, char_tokenizer, max_batch=max_batch, kv_cache_dtype="float32")
        if cached:  # the shared prefix in the cache first
            engine.submit(char_tokenizer.encode(shared + "x"), SamplingParams(max_new_tokens=1))
            engine.run_until_idle()
        seqs = [
            engine.submit(char_tokenizer.encode(t), SamplingParams(max_new_tokens=2)) for t in texts
        ]
        engine.step()
        return engine, seqs

    together, seqs = prefilled(prompts, 4)
    for seq, prompt in zip(seqs, prompts):
        alone, _ = prefilled([prompt], 1)
        row, n = together.active.index(seq), len(char_tokenizer.encode(prompt)) - 1
        for name in ("k0", "v0", "k1", "v1"):
            assert torch.equal(together.state[name][row, :, :n], alone.state[name][0, :, :n])
