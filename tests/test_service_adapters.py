"""LoRA adapters through the server: --adapter NAME=DIR, one batch for a base and its
adapters (each request's text as when served alone), /v1/models parents, start-up errors."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest
import torch

from lm import lora
from lm.checkpoint import load_checkpoint
from lm.errors import LMError
from service.app import create_app
from service.loader import load_checkpoints
from service.settings import Settings

SAMPLED = {"temperature": 1.0, "top_k": 0}


def make_adapter(base_dir, out, rank: int, seed: int):
    """Random adapter matrices of a trained adapter's size: with much larger ones the base
    model's own rounding differences between batch sizes (its matrix products are not
    bitwise row-stable either) would turn into different samples."""
    model = load_checkpoint(base_dir).model
    lora.add_lora(model, rank, alpha=2.0 * rank)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, lora.LoRALinear):
                module.lora_A.normal_(0.0, 0.1, generator=generator)
                module.lora_B.normal_(0.0, 0.1, generator=generator)
    lora.save_adapter(out, model, lora.base_info(base_dir))
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_checkpoint_dir):
    root = tmp_path_factory.mktemp("served-adapters")
    return {
        "poet": make_adapter(tiny_checkpoint_dir, root / "poet", 2, 1),
        "sailor": make_adapter(tiny_checkpoint_dir, root / "sailor", 4, 2),
    }


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir, adapter_dirs, launch):
    settings = Settings(
        checkpoints=[str(tiny_checkpoint_dir)],
        adapters=[f"{name}={path}" for name, path in adapter_dirs.items()],
    )
    return launch(create_app(settings, load_checkpoints(settings)))


def test_models_lists_adapters_with_their_parent(server):
    data = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert {m["id"]: m["parent"] for m in data} == {"tiny": None, "poet": "tiny", "sailor": "tiny"}


def test_adapters_share_one_batch_and_answer_as_alone(server):
    engine = server.app.state.models["tiny"].engine
    assert server.app.state.models["poet"].engine is engine
    models = ["tiny", "poet", "sailor"]
    bodies = [
        {
            "model": models[i % 3],
            "prompt": "The king speaks of"[: 6 + i % 9],
            "max_tokens": 30,
            "seed": 100 + i,
            **SAMPLED,
        }
        for i in range(24)
    ]
    peak, done = [set()], threading.Event()

    def watch():  # which adapters ran in one step together
        while not done.is_set():
            peak[0] = max(peak[0], {seq.adapter for seq in list(engine.active)}, key=len)
            done.wait(0.0005)

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        together = asyncio.run(burst())
    finally:
        done.set()
        watcher.join()
    assert all(r.status_code == 200 for r in together)
    assert peak[0] == {0, 1, 2}, "the base and both adapters never shared a step"
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)
    for i, body in enumerate(bodies):
        alone = client.completions.create(
            **{k: v for k, v in body.items() if k != "top_k"}, extra_body={"top_k": 0}
        )
        assert together[i].json()["choices"][0]["text"] == alone.choices[0].text, f"request {i}"
        assert together[i].json()["model"] == body["model"]
    same = {
        client.completions.create(
            model=m, prompt="The king", max_tokens=20, seed=5, temperature=1.0
        )
        .choices[0]
        .text
        for m in models
    }
    assert len(same) == 3  # each adapter changes the text


def test_embeddings_of_an_adapter_are_refused(server):
    response = httpx.post(f"{server.url}/v1/embeddings", json={"model": "poet", "input": "x"})
    assert response.status_code == 400
    assert "LoRA adapter" in response.json()["error"]["message"]


def test_adapter_errors_at_start_up(
    tiny_checkpoint_dir, adapter_dirs, tmp_path, tiny_gpt_saver, corpus_text
):
    other = tiny_gpt_saver(tmp_path / "other", corpus_text + "#@%")
    with pytest.raises(
        LMError,
        match="poet=.*trained on 'tiny'.*which is not served "
        r"\(served: other\)",
    ):
        load_checkpoints(
            Settings(checkpoints=[str(other)], adapters=[f"poet={adapter_dirs['poet']}"])
        )
    with pytest.raises(LMError, match="expected NAME=DIR"):
        load_checkpoints(Settings(checkpoints=[str(tiny_checkpoint_dir)], adapters=["poet"]))
    with pytest.raises(LMError, match="shares a name"):
        load_checkpoints(
            Settings(
                checkpoints=[str(tiny_checkpoint_dir)], adapters=[f"tiny={adapter_dirs['poet']}"]
            )
        )
    with pytest.raises(LMError, match="not an lm adapter"):
        load_checkpoints(
            Settings(checkpoints=[str(tiny_checkpoint_dir)], adapters=[f"x={tmp_path}"])
        )


def test_adapters_from_the_environment_and_flags(monkeypatch, adapter_dirs):
    import argparse

    from service.settings import add_arguments, settings_from_args

    monkeypatch.setenv("LM_ADAPTERS", f"poet={adapter_dirs['poet']}, sailor=/x")
    assert Settings().adapters == [f"poet={adapter_dirs['poet']}", "sailor=/x"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--adapter", "a=/1", "--adapter", "b=/2"])
    assert settings_from_args(args).adapters == ["a=/1", "b=/2"]
