"""Fine-tuning: --init-from with unknown tokens, LoRA adapters (train, load, merge), and
several adapters of one base in one engine batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lm import lora
from lm.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint
from lm.cli import main
from lm.engine import Engine
from lm.errors import LMError
from lm.finetune import encode_corpus, unknown_tokens
from lm.models import ModelConfig, build_model
from lm.sampling import SamplingParams
from lm.tokenizers import CharTokenizer

TRAIN = [
    "--batch-size",
    "4",
    "--block-size",
    "16",
    "--max-steps",
    "4",
    "--eval-interval",
    "2",
    "--warmup-steps",
    "1",
    "--device",
    "cpu",
    "--no-progress",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_gpt_saver, corpus_text) -> Path:
    return tiny_gpt_saver(tmp_path_factory.mktemp("base") / "base", corpus_text)


def make_adapter(
    base_dir: Path, out: Path, rank: int, seed: int, targets=lora.DEFAULT_TARGETS
) -> Path:
    """An adapter of `base_dir` with random (non-zero) matrices, as if trained."""
    model = load_checkpoint(base_dir).model
    lora.add_lora(model, rank, alpha=2.0 * rank, targets=targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, lora.LoRALinear):
                module.lora_A.normal_(0.0, 0.3, generator=generator)
                module.lora_B.normal_(0.0, 0.3, generator=generator)
    lora.save_adapter(out, model, lora.base_info(base_dir), {"note": "test"})
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_adapter(base_dir, root / "one", rank=2, seed=1),
        make_adapter(base_dir, root / "two", rank=4, seed=2, targets=("c_attn", "c_fc")),
    ]


def adapted_model(base_dir: Path, adapter_dir: Path) -> torch.nn.Module:
    """The base with the adapter's matrices on LoRALinear layers (not merged)."""
    adapter = lora.load_adapter(adapter_dir)
    model = load_checkpoint(base_dir).model
    targets = sorted({m.split(".")[-1] for m in adapter.meta["modules"]})
    lora.add_lora(model, adapter.meta["rank"], adapter.meta["alpha"], targets)
    with torch.no_grad():
        for name, (a, b) in adapter.pairs().items():
            model.get_submodule(name).lora_A.copy_(a)
            model.get_submodule(name).lora_B.copy_(b)
    return model.eval()


def test_new_adapter_trains_only_its_matrices_and_starts_as_the_base(base_dir):
    base = load_checkpoint(base_dir).model
    model = load_checkpoint(base_dir).model
    trainable = lora.add_lora(model, rank=3, alpha=6.0)
    c = model.config
    hidden = 4 * c.n_embd
    per_block = 3 * (
        (c.n_embd + 3 * c.n_embd)
        + (c.n_embd + c.n_embd)
        + (c.n_embd + hidden)
        + (hidden + c.n_embd)
    )
    assert trainable == c.n_layer * per_block
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.0.{layer}.lora_{m}"
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        for m in "AB"
    }
    ids = torch.randint(1, c.vocab_size, (2, 10))
    torch.testing.assert_close(model.eval()(ids), base(ids))


def test_lora_step_equals_forward(base_dir, adapters):
    model = adapted_model(base_dir, adapters[0])
    ids = torch.randint(1, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        whole = model(ids)
        state = model.init_state(2)
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t : t + 1], state)
            torch.testing.assert_close(logits, whole[:, t], atol=1e-5, rtol=1e-5)


def test_merge_writes_a_checkpoint_with_the_adapters_outputs(base_dir, adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(adapters[0]), str(out)]) == 0
    assert (out / CONFIG_FILE).is_file() and (out / WEIGHTS_FILE).is_file()
    merged = load_checkpoint(out)
    assert merged.training["merged_from"]["base"]["name"] == "base"
    ids = torch.randint(1, merged.config.vocab_size, (3, 20))
    with torch.no_grad():
        expected = adapted_model(base_dir, adapters[0])(ids)
        torch.testing.assert_close(merged.model(ids), expected, atol=1e-5, rtol=0)
        base = load_checkpoint(base_dir).model(ids)
    assert (base - expected).abs().max() > 0.1  # the adapter does change the outputs


def test_generate_accepts_an_adapter_directory(base_dir, adapters, capsys):
    loaded = load_checkpoint(adapters[0])  # the base, the adapter merged in
    assert loaded.name == "one" and loaded.meta["adapter"]["base"]["name"] == "base"
    code = main(
        [
            "generate",
            "--checkpoint",
            str(adapters[0]),
            "--max-new-tokens",
            "12",
            "--seed",
            "3",
            "--device",
            "cpu",
            "The king",
        ]
    )
    assert code == 0
    assert len(capsys.readouterr().out.strip()) > 0


def test_engine_serves_adapters_in_one_batch_as_each_alone(base_dir, adapters):
    """Rows of the base and of two adapters (ranks 2 and 4, different targets) share a
    batch; each row's text equals the one it gets alone, and its logits the merged model's."""
    ckpt = load_checkpoint(base_dir)
    lora.attach_adapters(ckpt.model, [lora.load_adapter(a) for a in adapters])
    prompts = [ckpt.tokenizer.encode(p) for p in ("The king", "A young poet remembers", "We")]

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=15 + 3 * i, temperature=1.0, top_k=0, seed=7)

    jobs = [(i, prompt, adapter) for i, prompt in enumerate(prompts) for adapter in (0, 1, 2)]
    engine = Engine(ckpt.model, ckpt.tokenizer, max_batch=16)
    together = [engine.submit(prompt, params(i), adapter=adapter) for i, prompt, adapter in jobs]
    engine.run_until_idle()
    texts = {}
    for (i, prompt, adapter), seq in zip(jobs, together):
        alone = Engine(ckpt.model, ckpt.tokenizer, max_batch=1)
        solo = alone.submit(prompt, params(i), adapter=adapter)
        alone.run_until_idle()
        assert seq.generated == solo.generated, f"prompt {i}, adapter {adapter}"
        texts[i, adapter] = seq.generated
    assert all(len({tuple(texts[i, a]) for a in (0, 1, 2)}) == 3 for i in range(3))

    ids = torch.tensor([prompts[1][:4]] * 3)
    with torch.inference_mode():
        state = ckpt.model.init_state(3)
        state["adapter"].copy_(torch.tensor([0, 1, 2]))
        logits, _ = ckpt.model.step(ids, state)
        for row, directory in enumerate([base_dir, *adapters]):
            reference = load_checkpoint(directory).model
            state = reference.init_state(1)
            expected, _ = reference.step(ids[:1], state)
            torch.testing.assert_close(logits[row : row + 1], expected, atol=1e-5, rtol=0)


def test_adapter_that_does_not_fit_is_a_clear_error(
    adapters, tmp_path, corpus_text, tiny_gpt_saver
):
    adapter = lora.load_adapter(adapters[0])
    narrow = build_model(ModelConfig(kind="gpt", vocab_size=40, n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(
        LMError, match="blocks.0.attn.c_attn is 96x32 with rank 2, the base's layer is 48x16"
    ):
        lora.attach_adapters(narrow, [adapter])
    other = tiny_gpt_saver(tmp_path / "other", corpus_text + "#@%")
    with pytest.raises(LMError, match="was trained on 'base'"):
        lora.check_fits(adapter, load_checkpoint(other).model, other)
    lstm = build_model(ModelConfig(kind="lstm", vocab_size=40, n_layer=1, n_embd=16))
    with pytest.raises(LMError, match="LoRA applies to GPT models"):
        lora.add_lora(lstm, 2, 4.0)
    with pytest.raises(LMError, match="no linear layer .* called wq"):
        lora.add_lora(narrow, 2, 4.0, targets=("wq",))
    config = json.loads((adapters[0] / lora.ADAPTER_CONFIG).read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / lora.ADAPTER_WEIGHTS).write_bytes((adapters[0] / lora.ADAPTER_WEIGHTS).read_bytes())
    config["base"]["path"] = str(tmp_path / "nowhere")
    (moved / lora.ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(LMError, match="its base 'base' .* is neither at"):
        load_checkpoint(moved)


# -- training --------------------------------------------------------------------------------


def test_unknown_characters_are_counted_then_mapped_or_dropped():
    tokenizer = CharTokenizer.train("abc ")
    counts = unknown_tokens(tokenizer, "abc xyz ax")
    assert counts == {"x": 2, "y": 1, "z": 1}
    mapped, _ = encode_corpus(tokenizer, "ab xa", "map")
    dropped, _ = encode_corpus(tokenizer, "ab xa", "drop")
    assert mapped == [2, 3, 1, 0, 2]  # " " is 1, "a" 2, "b" 3; unknown "x" is <unk>, 0
    assert dropped == [2, 3, 1, 2]
    assert tokenizer.vocab_size == 5  # <unk> has always been id 0: old checkpoints unchanged


def test_init_from_fine_tunes_the_parent(base_dir, tmp_path, caplog):
    corpus = tmp_path / "new.txt"
    corpus.write_text("The queen writes {code} & #hashes; " * 40, encoding="utf-8")
    out = tmp_path / "ft"
    code = main(
        [
            "train",
            "--init-from",
            str(base_dir),
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            "--lr",
            "3e-3",
            *TRAIN,
        ]
    )
    err = caplog.text
    assert code == 0
    assert (
        "160 of 1,400 characters (4 distinct) are not in the parent's vocabulary" in err
        and "'{'" in err
        and "mapped to <unk>" in err
    )
    child = load_checkpoint(out)
    parent = load_checkpoint(base_dir)
    assert child.config == parent.config
    assert child.tokenizer.itos == parent.tokenizer.itos
    assert child.training["parent"]["name"] == "base"
    assert child.training["parent"]["weights_hash"] == lora.weights_hash(base_dir)
    assert child.training["unknown_tokens"]["distinct"] == 4  # { } & #
    assert child.training["trainable_params"] == parent.model.num_params() + 64 * 32
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(child.model.state_dict().values(), parent.model.state_dict().values())
    )
    assert changed


def test_a_recipes_parent_is_relative_to_the_recipe(base_dir, tmp_path, monkeypatch):
    """Like its corpus, a recipe's init_from is found from the recipe's folder, whatever
    the working directory."""
    import shutil

    shutil.copytree(base_dir, tmp_path / "runs" / "base")
    (tmp_path / "runs" / "new.txt").write_text("The sailor sings. " * 40, encoding="utf-8")
    recipe = tmp_path / "runs" / "ft" / "recipe.toml"
    recipe.parent.mkdir()
    recipe.write_text('init_from = "../base"\ncorpus = ["../new.txt"]\nout = "."\n')
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    assert main(["train", "--config", str(recipe), *TRAIN]) == 0
    assert load_checkpoint(recipe.parent).training["parent"]["name"] == "base"


def test_lora_training_writes_a_small_adapter_naming_its_base(base_dir, tmp_path, capsys):
    corpus = tmp_path / "new.txt"
    corpus.write_text("The sailor sings about the sea. " * 40, encoding="utf-8")
    out = tmp_path / "adapter"
    code = main(
        [
            "train",
            "--init-from",
            str(base_dir),
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            "--lora-rank",
            "2",
            "--lora-targets",
            "c_attn",
            "--unknown",
            "drop",
            *TRAIN,
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert not (out / WEIGHTS_FILE).exists()
    meta = json.loads((out / lora.ADAPTER_CONFIG).read_text())
    assert meta["base"]["weights_hash"] == lora.weights_hash(base_dir)
    assert meta["modules"] == ["blocks.0.attn.c_attn"] and meta["rank"] == 2
    assert meta["trainable_params"] == 2 * (32 + 96) == meta["training"]["trainable_params"]
    assert meta["training"]["finished"] and meta["training"]["parent"]["name"] == "base"
    adapter = lora.load_adapter(out)
    assert any(b.abs().max() > 0 for _, b in adapter.pairs().values())  # it trained
    assert load_checkpoint(out).name == "adapter"


def test_lora_needs_a_parent(tmp_path, corpus_path, capsys):
    code = main(
        [
            "train",
            "--corpus",
            str(corpus_path),
            "--out",
            str(tmp_path / "x"),
            "--lora-rank",
            "2",
            *TRAIN,
        ]
    )
    assert code == 2
    assert (
        "--lora-rank trains adapters of a trained model: add --init-from" in capsys.readouterr().err
    )
