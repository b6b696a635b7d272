"""lm-evaluation-harness itself against `lm serve`: its `local-completions` model with the
remote tokenizer (/tokenizer_info, /tokenize, /detokenize), on a loglikelihood task and a
generate_until task defined from local files (tests/lm_eval_tasks), offline. The
loglikelihoods it reports equal ours computed directly from the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from subprocess_server import lm_serve

from lm.checkpoint import load_checkpoint

pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def served(tiny_checkpoint_dir: Path):
    with lm_serve(tiny_checkpoint_dir, env={"LM_API_KEY": "eval-key"}) as server:
        yield server.url


@pytest.fixture(scope="module")
def results(served: str, tmp_path_factory) -> dict[str, list[dict]]:
    """Run lm_eval's CLI once on both tasks; its logged samples by task."""
    out = tmp_path_factory.mktemp("lm_eval")
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(out / "hf"),
        "OPENAI_API_KEY": "eval-key",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "local-completions",
        "--model_args",
        f"model=tiny,base_url={served}/v1/completions,"
        "tokenizer_backend=remote,auth_token=eval-key,num_concurrent=1,max_retries=1,"
        "max_length=64",
        "--tasks",
        "lm_tiny_choice,lm_tiny_continue",
        "--include_path",
        ".",
        "--output_path",
        str(out / "results"),
        "--log_samples",
    ]
    run = subprocess.run(command, cwd=TASKS, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    samples: dict[str, list[dict]] = {}
    for path in (out / "results").rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return samples


def loglikelihood(checkpoint, context: str, continuation: str) -> float:
    """Ours: log p(continuation | context), summed over the continuation's tokens, with the
    split lm-eval makes (the context's tokens, then the rest of the whole's)."""
    whole = checkpoint.tokenizer.encode(context + continuation)
    start = len(checkpoint.tokenizer.encode(context))
    with torch.no_grad():
        logits = checkpoint.model(torch.tensor([whole]))[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole)))


def test_loglikelihoods_equal_ours(results, tiny_checkpoint_dir):
    checkpoint = load_checkpoint(tiny_checkpoint_dir)
    samples = results["lm_tiny_choice"]
    assert len(samples) == 3
    compared = 0
    for sample in samples:
        for arguments, response in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = arguments["arg_0"], arguments["arg_1"]
            reported = float(response[0][0])
            assert reported == pytest.approx(
                loglikelihood(checkpoint, context, continuation), abs=1e-3
            )
            compared += 1
    assert compared == 8


def test_generations_equal_greedy_completions(results, served):
    samples = results["lm_tiny_continue"]
    assert len(samples) == 2
    for sample in samples:
        context = sample["arguments"]["gen_args_0"]["arg_0"]
        ours = httpx.post(
            f"{served}/v1/completions",
            headers={"Authorization": "Bearer eval-key"},
            json={"prompt": context, "max_tokens": 8, "temperature": 0, "stop": ["\n"]},
            timeout=60,
        ).json()["choices"][0]["text"]
        assert sample["resps"][0][0] == ours
