"""lm export: transformers folders with equal logits, GGUF files read back, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lm.checkpoint import load_checkpoint, save_checkpoint
from lm.cli import main
from lm.errors import LMError
from lm.export import export, gguf_tensors, token_bytes
from lm.models import ModelConfig, build_model
from lm.tokenizers import train_tokenizer

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


def _tiny(directory, corpus_text, kind="char", seed=0, **options):
    """A 2-layer GPT with random weights (biases and norms too, so each one counts)."""
    tokenizer = train_tokenizer(kind, corpus_text, vocab_size=None if kind == "char" else 300)
    torch.manual_seed(seed)
    config = ModelConfig(
        kind=options.pop("model", "gpt"),
        vocab_size=tokenizer.vocab_size,
        n_layer=2,
        n_embd=32,
        n_head=4,
        block_size=64,
        **options,
    )
    model = build_model(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    save_checkpoint(directory, model, tokenizer)
    return directory


MODERN = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "rope_theta": 5000.0}
BLOCKS = {  # options -> the transformers class they are
    "classic": ({}, "GPT2LMHeadModel"),
    "classic-bias-untied": ({"bias": True, "tie_embeddings": False}, "GPT2LMHeadModel"),
    "llama": (MODERN, "LlamaForCausalLM"),
    "llama-untied": ({**MODERN, "tie_embeddings": False}, "LlamaForCausalLM"),
    "qwen3": ({**MODERN, "qk_norm": True, "tie_embeddings": False}, "Qwen3ForCausalLM"),
    "qwen3-tied": ({**MODERN, "qk_norm": True, "mlp_hidden": 48}, "Qwen3ForCausalLM"),
}
KIND_BLOCKS = [("char", name) for name in BLOCKS] + [
    ("word", "classic"),
    ("bpe", "classic"),
    ("bpe", "qwen3"),
]


@pytest.mark.parametrize(("kind", "block"), KIND_BLOCKS)
def test_hf_export_loads_in_transformers_with_equal_logits(kind, block, corpus_text, tmp_path):
    transformers = pytest.importorskip("transformers")
    options, hf_class = BLOCKS[block]
    ckpt_dir = _tiny(tmp_path / "ckpt", corpus_text, kind, **options)
    out = export(ckpt_dir, tmp_path / "hf", "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == hf_class
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    ours = load_checkpoint(ckpt_dir)
    text = corpus_text[:300] + TEXT
    ids = ours.tokenizer.encode(text)
    assert tokenizer(text)["input_ids"] == ids
    assert tokenizer.decode(ids) == ours.tokenizer.decode(ids)
    batch = torch.tensor([ids[:64]])
    with torch.no_grad():
        expected, actual = ours.model(batch), model(batch).logits
    assert torch.allclose(actual, expected, atol=1e-4, rtol=0)


def test_hf_export_of_the_shipped_char_gpt(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = export("shakespeare-char-gpt", tmp_path / "hf", "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_checkpoint("shakespeare-char-gpt")
    ids = torch.tensor([ours.tokenizer.encode(TEXT)])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ours.model(ids), atol=1e-4, rtol=0)
    # The shipped model has Qwen3's blocks (issue 20): it exports as Qwen3, context 256.
    assert model.config.model_type == "qwen3" and not model.config.tie_word_embeddings
    assert model.config.max_position_embeddings == 256


def test_hf_export_refuses_a_non_empty_directory(corpus_text, tmp_path):
    ckpt_dir = _tiny(tmp_path / "ckpt", corpus_text)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(LMError, match="not empty"):
        export(ckpt_dir, tmp_path / "hf", "hf")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_gguf_reads_back_with_gpt2_tensors_and_vocabulary(kind, corpus_text, tmp_path):
    gguf = pytest.importorskip("gguf")
    ckpt_dir = _tiny(tmp_path / "ckpt", corpus_text, kind, bias=True)
    path = export(ckpt_dir, tmp_path / "model.gguf", "gguf")
    reader = gguf.GGUFReader(str(path))
    ours = load_checkpoint(ckpt_dir)
    config = ours.config

    def field(name):
        return reader.fields[name].contents()

    assert field("general.architecture") == "gpt2"
    assert field("gpt2.context_length") == config.block_size
    assert field("gpt2.embedding_length") == config.n_embd
    assert field("gpt2.feed_forward_length") == 4 * config.n_embd
    assert field("gpt2.block_count") == config.n_layer
    assert field("gpt2.attention.head_count") == config.n_head
    assert field("gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field("tokenizer.ggml.model") == "rwkv"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size == ours.tokenizer.vocab_size
    # every token's text unescapes to the bytes lm decodes it to
    pieces = token_bytes(ours.tokenizer)
    assert [_unescape(t) for t in tokens[1:]] == pieces[1:]
    ids = ours.tokenizer.encode(TEXT)
    assert b"".join(pieces[i] for i in ids).decode("utf-8") == ours.tokenizer.decode(ids)

    expected = gguf_tensors(ours.model, _gpt2())
    assert {t.name for t in reader.tensors} == set(expected)
    assert "output.weight" not in expected  # tied head: llama.cpp reuses token_embd
    for tensor in reader.tensors:
        want = expected[tensor.name].detach().numpy()
        assert tuple(int(n) for n in reversed(tensor.shape)) == want.shape, tensor.name
        assert np.array_equal(np.asarray(tensor.data).reshape(want.shape), want), tensor.name
    assert len(reader.tensors) == 4 + 12 * config.n_layer


def test_gguf_names_the_shipped_char_gpt_tokens(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = export("shakespeare-char-gpt", tmp_path / "m.gguf", "gguf")
    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    ours = load_checkpoint("shakespeare-char-gpt").tokenizer
    assert tokens[0] == "<unk>" and reader.fields["tokenizer.ggml.unknown_token_id"].contents() == 0
    assert [_unescape(t).decode() for t in tokens[1:]] == ours.itos[1:]
    assert tokens[ours.token_to_id("\n")] == "\\n"


def _gpt2():
    from lm.export import GPT2

    return GPT2


@pytest.mark.parametrize("block", ["llama", "qwen3"])
def test_gguf_of_modern_blocks_reads_back(block, corpus_text, tmp_path):
    gguf = pytest.importorskip("gguf")
    from lm.export import LLAMA, QWEN3

    options = BLOCKS[block][0]
    ckpt_dir = _tiny(tmp_path / "ckpt", corpus_text, **options)
    reader = gguf.GGUFReader(str(export(ckpt_dir, tmp_path / "m.gguf", "gguf")))
    ours = load_checkpoint(ckpt_dir)
    config = ours.config
    head_dim = config.n_embd // config.n_head
    assert reader.fields["general.architecture"].contents() == block
    assert reader.fields[f"{block}.rope.freq_base"].contents() == pytest.approx(5000.0)
    assert reader.fields[f"{block}.rope.dimension_count"].contents() == head_dim
    assert reader.fields[f"{block}.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(
        1e-6
    )
    assert (
        reader.fields[f"{block}.feed_forward_length"].contents()
        == ours.model.blocks[0].mlp.c_proj.in_features
    )
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert ("blk.0.attn_q_norm.weight" in tensors) == (block == "qwen3")
    assert ("output.weight" in tensors) == (not config.tie_embeddings)
    attn = ours.model.blocks[1].attn
    q = attn.c_attn.weight[: config.n_embd].detach().numpy()
    stored = tensors["blk.1.attn_q.weight"].reshape(q.shape)
    if block == "qwen3":  # rotate-half, as lm
        assert np.array_equal(stored, q)
    else:  # llama.cpp's llama rotates adjacent pairs: within each head, rows (i, i + D/2) -> (2i, 2i + 1)
        heads = q.reshape(config.n_head, head_dim, -1)
        half = head_dim // 2
        assert np.array_equal(stored.reshape(heads.shape)[:, 0::2], heads[:, :half])
        assert np.array_equal(stored.reshape(heads.shape)[:, 1::2], heads[:, half:])
    gate = ours.model.blocks[0].mlp.c_fc.weight.chunk(2)[0].detach().numpy()
    assert np.array_equal(tensors["blk.0.ffn_gate.weight"].reshape(gate.shape), gate)
    assert set(tensors) == set(gguf_tensors(ours.model, QWEN3 if block == "qwen3" else LLAMA))


REFUSED = {
    "logit_softcap": ({"logit_softcap": 30.0}, "soft-capping"),
    "relu2": ({"mlp": "relu2"}, "ReLU-squared"),
    "rope-with-layernorm": ({"position": "rope"}, "mixes classic and modern"),
    "modern-with-gelu": ({**MODERN, "mlp": "gelu"}, "mixes classic and modern"),
    "modern-with-bias": ({**MODERN, "bias": True}, "mixes classic and modern"),
}


@pytest.mark.parametrize("options,message", REFUSED.values(), ids=REFUSED.keys())
def test_options_outside_the_exportable_blocks_are_refused(options, message, corpus_text, tmp_path):
    ckpt_dir = _tiny(tmp_path / "ckpt", corpus_text, **options)
    for fmt in ("hf", "gguf"):
        with pytest.raises(LMError, match=message):
            export(ckpt_dir, tmp_path / f"out-{fmt}", fmt)
        assert not (tmp_path / f"out-{fmt}").exists()


def _unescape(text: str) -> bytes:
    """llama.cpp's llama_unescape_rwkv_token, in Python."""
    out, chars, i = bytearray(), text, 0
    while i < len(chars):
        char = chars[i]
        if char == "\\":
            nxt = chars[i + 1]
            if nxt == "x":
                out.append(int(chars[i + 2 : i + 4], 16))
                i += 4
                continue
            out += {"n": b"\n", "t": b"\t", "r": b"\r"}.get(nxt, nxt.encode())
            i += 2
            continue
        out += char.encode("utf-8")
        i += 1
    return bytes(out)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_recurrent_models_are_refused_with_a_clear_error(fmt, corpus_text, tmp_path, capsys):
    ckpt_dir = _tiny(tmp_path / "ckpt", corpus_text, model="lstm")
    with pytest.raises(LMError, match="GPT checkpoints only; a lstm"):
        export(ckpt_dir, tmp_path / "out", fmt)
    assert main(["export", "--format", fmt, str(ckpt_dir), str(tmp_path / "out")]) == 2
    assert "recurrent models stay in lm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_export_writes_both_formats(corpus_text, tmp_path, capsys):
    pytest.importorskip("gguf")
    ckpt_dir = _tiny(tmp_path / "ckpt", corpus_text)
    assert main(["export", "--format", "hf", str(ckpt_dir), str(tmp_path / "hf")]) == 0
    assert main(["export", "--format", "gguf", str(ckpt_dir), str(tmp_path / "m.gguf")]) == 0
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert (tmp_path / "m.gguf").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_sentencepiece_tokenizers_are_refused(fmt, corpus_text, tmp_path):
    tokenizer = train_tokenizer("spm", corpus_text, vocab_size=300)
    model = build_model(
        ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=16)
    )
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    with pytest.raises(LMError, match="spm tokenizer .* not supported"):
        export(tmp_path / "ckpt", tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()
