"""GPU inference: the model dtype setting, the decode step CUDA graphs record
(`GPT.fixed_step`, checked on the CPU too) and, where a CUDA device is present, the
engine, the graphs and the server on it against the CPU."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_gpt

from lm.checkpoint import load_checkpoint
from lm.cuda_graphs import GraphedDecode
from lm.device import pick_dtype
from lm.engine import Engine
from lm.errors import LMError
from lm.sampling import SamplingParams
from lm.tokenizers import CharTokenizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODERN = dict(
    position="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", bias=False, tie_embeddings=False
)


def test_pick_dtype():
    cpu = torch.device("cpu")
    assert pick_dtype(cpu) == torch.float32
    assert pick_dtype(torch.device("cuda")) == torch.float32  # measured faster there
    assert pick_dtype(cpu, "bfloat16") == torch.bfloat16
    with pytest.raises(LMError, match="unknown dtype"):
        pick_dtype(cpu, "float8")


@pytest.mark.parametrize(
    "cache_dtype, atol", [(torch.float32, 1e-4), (torch.int8, 2e-2)], ids=["float32", "int8"]
)
@pytest.mark.parametrize("options", [{}, MODERN], ids=["classic", "modern"])
def test_fixed_step_equals_forward(options, cache_dtype, atol):
    """Rows at different positions (one past the context, as a free row a graph carries):
    each row's logits are `forward`'s at its newest token (an int8 cache's within its
    rounding), and positions advance by one."""
    model = random_gpt(**options)
    torch.manual_seed(1)
    lengths = [1, 5, 17, 31]
    seqs = [torch.randint(0, 40, (n + 1,)) for n in lengths]
    state = model.init_state(len(seqs) + 1, torch.device("cpu"), cache_dtype=cache_dtype)
    with torch.inference_mode():
        for row, seq in enumerate(seqs):  # prefill each row with all but its newest token
            view = {name: tensor[row : row + 1] for name, tensor in state.items()}
            _, new = model.step(seq[None, :-1], view)
            view["pos"].copy_(new["pos"])
        state["pos"][-1] = model.config.block_size  # a free row past the end
        ids = torch.stack([seq[-1:] for seq in seqs] + [torch.tensor([0])])
        logits = model.fixed_step(ids, state)
        for row, seq in enumerate(seqs):
            want = model(seq[None])[0, -1]
            torch.testing.assert_close(logits[row], want, atol=atol, rtol=1e-4)
    assert state["pos"].tolist() == [n + 1 for n in lengths] + [model.config.block_size + 1]


def test_dtype_flag_generates_on_the_cpu(capsys):
    from lm.cli import main

    status = main(
        ["generate", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0"]
        + ["--dtype", "bfloat16"]
    )
    out = capsys.readouterr().out
    assert status == 0 and len(out) > 20


def test_serve_settings_have_dtype_and_cuda_graphs():
    from service.settings import Settings

    settings = Settings(dtype="bfloat16", cuda_graphs=False)
    assert settings.dtype == "bfloat16" and settings.cuda_graphs is False
    with pytest.raises(ValueError):
        Settings(dtype="float8")


# -- on a CUDA device ---------------------------------------------------------------------


def greedy(engine: Engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    seqs = [
        engine.submit(p, SamplingParams(max_new_tokens=tokens, temperature=0.0)) for p in prompts
    ]
    engine.run_until_idle()
    return [seq.generated for seq in seqs]


@cuda
def test_engine_on_cuda_matches_the_cpu():
    """The shipped GPT in float32, greedy, 120 tokens from four prompts: the same tokens on
    the GPU (CUDA graphs and eager) as on the CPU."""
    prompts_text = ["ROMEO:\n", "JULIET:\nO ", "First Citizen:\nWe are", "KING HENRY"]
    cpu = load_checkpoint("shakespeare-char-gpt")
    prompts = [cpu.tokenizer.encode(p) for p in prompts_text]
    want = greedy(Engine(cpu.model, cpu.tokenizer, max_batch=4), prompts, 120)
    gpu = load_checkpoint("shakespeare-char-gpt", "cuda", torch.float32)
    for graphs in (True, False):
        engine = Engine(gpu.model, gpu.tokenizer, max_batch=4, cuda_graphs=graphs)
        assert (engine.graphs is not None) == graphs
        assert greedy(engine, prompts, 120) == want


class FixedSteps(GraphedDecode):
    """What `GraphedDecode` replays, run as it is recorded but without a graph (for the
    CPU): `fixed_step` over the whole bucket of rows, the rows past n included."""

    def __init__(self, model, state, max_batch):
        self.model, self.state, self.max_batch = model, state, max_batch
        self.calls = 0

    def __call__(self, ids):
        self.calls += 1
        rows, size = ids.shape[0], self.bucket(ids.shape[0])
        padded = torch.zeros(size, 1, dtype=torch.long, device=ids.device)
        padded[:rows] = ids
        view = {name: tensor[:size] for name, tensor in self.state.items()}
        return self.model.fixed_step(padded, view)[:rows]


def mixed_requests(engine: Engine, tokenizer) -> list[list[int]]:
    """Sampled requests of every kind, past the context (sliding window, rows sitting out),
    joining and leaving at different steps."""
    from tests.test_engine import MIXED_PARAMS

    seqs = [
        engine.submit(
            tokenizer.encode("abc de"[: 1 + i % 6]),
            SamplingParams(max_new_tokens=20 + 7 * i, **MIXED_PARAMS[i % len(MIXED_PARAMS)]),
        )
        for i in range(13)
    ]
    engine.run_until_idle()
    return [seq.generated for seq in seqs]


TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLM\n.,"


@pytest.mark.parametrize("options", [{}, MODERN], ids=["classic", "modern"])
def test_engine_with_fixed_steps_equals_eager_steps(options):
    """The engine's graph path on the CPU: the same tokens as its usual steps."""
    tokenizer = CharTokenizer.train(TEXT)
    model = random_gpt(vocab_size=tokenizer.vocab_size, **options)
    want = mixed_requests(
        Engine(model, tokenizer, max_batch=8, kv_cache_dtype="float32"), tokenizer
    )
    engine = Engine(model, tokenizer, max_batch=8, kv_cache_dtype="float32")
    engine.graphs = FixedSteps(model, engine.state, 8)
    assert mixed_requests(engine, tokenizer) == want
    assert engine.graphs.calls > 50


@cuda
@pytest.mark.parametrize("options", [{}, MODERN], ids=["classic", "modern"])
def test_cuda_graphs_equal_eager_steps(options):
    tokenizer = CharTokenizer.train(TEXT)
    model = random_gpt(vocab_size=tokenizer.vocab_size, **options).cuda()
    outputs = []
    for graphs in (True, False):
        engine = Engine(model, tokenizer, max_batch=8, cuda_graphs=graphs)
        outputs.append(mixed_requests(engine, tokenizer))
    assert outputs[0] == outputs[1]


@cuda
def test_bfloat16_on_cuda_stays_close():
    """bfloat16 weights on the GPU: the fixed step's logits within bfloat16's rounding of
    float32 `forward`'s."""
    model = random_gpt(**MODERN).cuda()
    seq = torch.randint(0, 40, (1, 12), device="cuda")
    want = model(seq)[0, -1].float()
    half = random_gpt(**MODERN).cuda().to(torch.bfloat16)
    state = half.init_state(1, torch.device("cuda"))
    with torch.inference_mode():
        _, new = half.step(seq[:, :-1], state)
        state["pos"].copy_(new["pos"])
        got = half.fixed_step(seq[:, -1:], state)[0].float()
    assert (got - want).abs().max().item() < 0.1 * want.abs().max().item()


@cuda
def test_serve_on_cuda():
    """`lm serve --device cuda --dtype bfloat16` (graphs): completions, streaming and
    the prompt log-probabilities lm-evaluation-harness asks for."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(
        Settings(device="cuda", dtype="bfloat16", checkpoints=["shakespeare-char-gpt"])
    )
    with TestClient(app) as client:
        body = {"model": "shakespeare-char-gpt", "prompt": "ROMEO:", "max_tokens": 40}
        reply = client.post("/v1/completions", json={**body, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 40
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) > 2
        scored = client.post(
            "/v1/completions",
            json={**body, "max_tokens": 0, "echo": True, "logprobs": 1},
        )
        assert scored.status_code == 200, scored.text
        logprobs = scored.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert logprobs[0] is None and all(v <= 0 for v in logprobs[1:])


@cuda
def test_training_on_cuda(tmp_path, corpus_path):
    """A few steps of `lm train --device cuda` (bfloat16 autocast) write a checkpoint
    that loads and generates."""
    from lm.train import TrainConfig, Trainer

    config = TrainConfig(
        corpus=[str(corpus_path)],
        out=str(tmp_path / "run"),
        model="gpt",
        n_layer=1,
        n_embd=32,
        n_head=2,
        block_size=32,
        batch_size=4,
        max_steps=20,
        eval_interval=10,
        eval_tokens=512,
        device="cuda",
    )
    Trainer(config, progress=False).train()
    ckpt = load_checkpoint(tmp_path / "run", "cuda")
    engine = Engine(ckpt.model, ckpt.tokenizer, max_batch=2)
    assert len(greedy(engine, [ckpt.tokenizer.encode("a")], 10)[0]) == 10
