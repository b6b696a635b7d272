"""Carry a checkpoint to other engines: a transformers folder (`export_hf`) or a GGUF (`export_gguf`).

A GPT of classic blocks becomes GPT-2 (`GPT2LMHeadModel`, llama.cpp's `gpt2`); modern
blocks (rotary positions, RMSNorm, SwiGLU, no biases) become Llama, or Qwen3 with QK-norm.
Options neither engine computes (logit soft-capping, ReLU-squared MLPs, mixtures of classic
and modern parts) are refused with an error naming them, never exported approximately.
Recurrent models have no such architecture and are refused too.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.checkpoint import Checkpoint, load_checkpoint
from lm.errors import LMError
from lm.models import ModelConfig
from lm.models.gpt import RMS_NORM_EPS, mlp_width
from lm.tokenizers import (
    TOKENIZER_FILE,
    UNK,
    BPETokenizer,
    Tokenizer,
    VocabTokenizer,
)

FORMATS = ("hf", "gguf")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which lm's classic blocks use


@dataclass(frozen=True)
class Architecture:
    """What a GPT config is in other engines' terms."""

    hf_class: str  # transformers' model class
    hf_model_type: str  # config.json "model_type"
    gguf_arch: str  # llama.cpp's general.architecture


GPT2 = Architecture("GPT2LMHeadModel", "gpt2", "gpt2")
LLAMA = Architecture("LlamaForCausalLM", "llama", "llama")
QWEN3 = Architecture("Qwen3ForCausalLM", "qwen3", "qwen3")


def _option(config: ModelConfig, name: str, default):
    """A GPT block option (configs from before the modern blocks lack them: classic)."""
    return getattr(config, name, default)


def architecture(config: ModelConfig) -> Architecture:
    """The transformers/llama.cpp architecture that computes exactly what `config` does."""
    if config.kind != "gpt":
        raise LMError(
            f"lm export supports GPT checkpoints only; a {config.kind} has no transformers or "
            "llama.cpp architecture (recurrent models stay in lm: serve them with `lm serve`)"
        )
    if _option(config, "logit_softcap", 0.0):
        raise LMError(
            "logit soft-capping (logit_softcap) has no counterpart in GPT-2, Llama "
            "or Qwen3; retrain without it to export"
        )
    mlp = _option(config, "mlp", "gelu")
    if mlp == "relu2":
        raise LMError(
            "ReLU-squared MLPs (mlp=relu2) have no counterpart in GPT-2, Llama or "
            "Qwen3; retrain with mlp=gelu (classic) or swiglu (modern) to export"
        )
    classic = {"position": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False}
    modern = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
    actual = {name: _option(config, name, classic.get(name, False)) for name in {*classic, *modern}}
    if all(actual[name] == value for name, value in classic.items()):
        return GPT2
    if all(actual[name] == value for name, value in modern.items()):
        return QWEN3 if actual["qk_norm"] else LLAMA
    mixed = ", ".join(f"{name}={actual[name]!r}" for name in sorted(actual))
    raise LMError(
        f"this GPT mixes classic and modern block options ({mixed}); exportable are the "
        "classic GPT-2 block (learned positions, layernorm, gelu, no qk_norm) and the modern "
        "one (rope, rmsnorm, swiglu, bias off; with qk_norm it is Qwen3, without Llama)"
    )


def export(checkpoint: str | Path, out: str | Path, fmt: str) -> Path:
    """Export `checkpoint` (a directory or shipped name) as `fmt` ("hf" or "gguf") to `out`."""
    if fmt not in FORMATS:
        raise LMError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    ckpt = load_checkpoint(checkpoint)
    architecture(ckpt.config)  # refuse before writing anything
    out = Path(out)
    return export_hf(ckpt, out) if fmt == "hf" else export_gguf(ckpt, out)


# -- transformers -------------------------------------------------------------------------


def export_hf(ckpt: Checkpoint, directory: Path) -> Path:
    """Write a folder that `AutoModelForCausalLM` and `AutoTokenizer.from_pretrained` load."""
    from safetensors.torch import save_file

    arch = architecture(ckpt.config)
    _check_tokenizer(ckpt.tokenizer, "transformers")
    if directory.exists() and any(directory.iterdir()):
        raise LMError(f"{directory}: exists and is not empty; choose a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    weights = {
        name: t.detach().to("cpu", torch.float32).contiguous().clone()
        for name, t in hf_state_dict(ckpt.model, arch).items()
    }
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    _write_json(directory / "config.json", hf_config(ckpt.config, arch))
    save_hf_tokenizer(ckpt.tokenizer, ckpt.path, directory, ckpt.config.block_size)
    return directory


def hf_config(config: ModelConfig, arch: Architecture) -> dict:
    """transformers' config.json for `config` as `arch`."""
    tied = _option(config, "tie_embeddings", True)
    common = {
        "architectures": [arch.hf_class],
        "model_type": arch.hf_model_type,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if arch is GPT2:
        return {
            **common,
            "n_positions": config.block_size,
            "n_ctx": config.block_size,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": mlp_width(config),
            "activation_function": "gelu",  # exact erf GELU
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "layer_norm_epsilon": LAYER_NORM_EPS,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    head_dim = config.n_embd // config.n_head
    return {
        **common,
        "hidden_size": config.n_embd,
        "intermediate_size": mlp_width(config),
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,
        "head_dim": head_dim,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "initializer_range": 0.02,
    }


def hf_state_dict(model: torch.nn.Module, arch: Architecture) -> dict[str, torch.Tensor]:
    """lm's weights under transformers' names (and layouts) for `arch`."""
    if arch is GPT2:
        return _gpt2_weights(model, transpose=True, prefix="transformer.")
    out = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.ln_f.weight}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        q, k, v = block.attn.c_attn.weight.chunk(3, dim=0)
        gate, up = block.mlp.c_fc.weight.chunk(2, dim=0)
        out |= {
            f"{prefix}input_layernorm.weight": block.ln_1.weight,
            f"{prefix}self_attn.q_proj.weight": q,
            f"{prefix}self_attn.k_proj.weight": k,
            f"{prefix}self_attn.v_proj.weight": v,
            f"{prefix}self_attn.o_proj.weight": block.attn.c_proj.weight,
            f"{prefix}post_attention_layernorm.weight": block.ln_2.weight,
            f"{prefix}mlp.gate_proj.weight": gate,
            f"{prefix}mlp.up_proj.weight": up,
            f"{prefix}mlp.down_proj.weight": block.mlp.c_proj.weight,
        }
        if arch is QWEN3:
            out[f"{prefix}self_attn.q_norm.weight"] = block.attn.q_norm.weight
            out[f"{prefix}self_attn.k_norm.weight"] = block.attn.k_norm.weight
    if model.lm_head.weight is not model.wte.weight:
        out["lm_head.weight"] = model.lm_head.weight
    return out


def _gpt2_weights(model, transpose: bool, prefix: str) -> dict[str, torch.Tensor]:
    """GPT-2's tensors by transformers' names; biases lm does not have (bias=False) are zeros.

    transformers' GPT-2 uses Conv1D, whose weights are the transpose of nn.Linear's.
    """

    def linear(layer: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
        return (layer.weight.T if transpose else layer.weight), bias

    def norm(layer: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        bias = layer.bias if layer.bias is not None else torch.zeros_like(layer.weight)
        return layer.weight, bias

    out = {f"{prefix}wte.weight": model.wte.weight, f"{prefix}wpe.weight": model.wpe.weight}
    for i, block in enumerate(model.blocks):
        parts = {
            "ln_1": norm(block.ln_1),
            "attn.c_attn": linear(block.attn.c_attn),
            "attn.c_proj": linear(block.attn.c_proj),
            "ln_2": norm(block.ln_2),
            "mlp.c_fc": linear(block.mlp.c_fc),
            "mlp.c_proj": linear(block.mlp.c_proj),
        }
        for name, (weight, bias) in parts.items():
            out[f"{prefix}h.{i}.{name}.weight"] = weight
            out[f"{prefix}h.{i}.{name}.bias"] = bias
    out[f"{prefix}ln_f.weight"], out[f"{prefix}ln_f.bias"] = norm(model.ln_f)
    if model.lm_head.weight is not model.wte.weight:  # untied head
        out["lm_head.weight"] = model.lm_head.weight
    return out


def save_hf_tokenizer(tokenizer: Tokenizer, source: Path, directory: Path, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json: AutoTokenizer gives a PreTrainedTokenizerFast."""
    if isinstance(tokenizer, BPETokenizer):
        shutil.copyfile(source / TOKENIZER_FILE, directory / TOKENIZER_FILE)
    elif isinstance(tokenizer, VocabTokenizer):
        tokenizer.to_hf().save(str(directory / TOKENIZER_FILE))
    else:
        raise LMError(_UNSUPPORTED_TOKENIZER.format(kind=tokenizer.kind, target="transformers"))
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
        },
    )


# -- GGUF (llama.cpp) ---------------------------------------------------------------------


def export_gguf(ckpt: Checkpoint, path: Path) -> Path:
    """Write a float32 GGUF that llama.cpp runs (architecture gpt2, llama or qwen3)."""
    try:
        import gguf
    except ImportError:
        raise LMError("GGUF export needs the gguf package: pip install 'lm[export]'") from None
    arch = architecture(ckpt.config)
    _check_tokenizer(ckpt.tokenizer, "GGUF")
    config = ckpt.config
    if path.is_dir():
        raise LMError(f"{path}: is a directory; give a file name such as model.gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch.gguf_arch)
    writer.add_name(ckpt.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_feed_forward_length(mlp_width(config))
    if arch is GPT2:
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
    else:
        head_dim = config.n_embd // config.n_head
        writer.add_head_count_kv(config.n_head)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    add_gguf_vocabulary(writer, ckpt.tokenizer)
    for name, tensor in gguf_tensors(ckpt.model, arch).items():
        writer.add_tensor(name, tensor.detach().to("cpu", torch.float32).contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_tensors(model: torch.nn.Module, arch: Architecture) -> dict[str, torch.Tensor]:
    """lm's weights under llama.cpp's tensor names for `arch` (nn.Linear layouts)."""
    if arch is GPT2:
        hf = _gpt2_weights(model, transpose=False, prefix="")
        out = {
            "token_embd.weight": hf["wte.weight"],
            "position_embd.weight": hf["wpe.weight"],
            "output_norm.weight": hf["ln_f.weight"],
            "output_norm.bias": hf["ln_f.bias"],
        }
        names = {
            "ln_1": "attn_norm",
            "attn.c_attn": "attn_qkv",
            "attn.c_proj": "attn_output",
            "ln_2": "ffn_norm",
            "mlp.c_fc": "ffn_up",
            "mlp.c_proj": "ffn_down",
        }
        for i in range(model.config.n_layer):
            for ours, theirs in names.items():
                for part in ("weight", "bias"):
                    out[f"blk.{i}.{theirs}.{part}"] = hf[f"h.{i}.{ours}.{part}"]
        if "lm_head.weight" in hf:
            out["output.weight"] = hf["lm_head.weight"]
        return out
    hf = hf_state_dict(model, arch)
    out = {
        "token_embd.weight": hf.pop("model.embed_tokens.weight"),
        "output_norm.weight": hf.pop("model.norm.weight"),
    }
    if "lm_head.weight" in hf:
        out["output.weight"] = hf.pop("lm_head.weight")
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    n_head = model.config.n_head
    for name, tensor in hf.items():
        _, _, layer, rest = name.split(".", 3)
        theirs = names[rest.removesuffix(".weight")]
        if arch is LLAMA and theirs in ("attn_q", "attn_k"):
            tensor = _interleave_rotary(tensor, n_head)
        out[f"blk.{layer}.{theirs}.weight"] = tensor
    return out


def _interleave_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection reordered from rotate-half pairs (i, i + D/2) to adjacent
    pairs (2i, 2i + 1): llama.cpp's llama rotates adjacent pairs (as convert_hf_to_gguf)."""
    rows, cols = weight.shape
    return weight.reshape(n_head, 2, rows // n_head // 2, cols).transpose(1, 2).reshape(rows, cols)


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes each token id stands for (what decoding it alone appends to the text)."""
    if isinstance(tokenizer, VocabTokenizer):  # <unk> decodes to nothing, as in lm
        return [b""] + [token.encode("utf-8") for token in tokenizer.itos[1:]]
    if isinstance(tokenizer, BPETokenizer):
        vocab = tokenizer.hf.get_vocab()
        pieces = sorted(vocab, key=vocab.__getitem__)
        decode = {char: byte for byte, char in _byte_level_alphabet().items()}
        return [bytes(decode[char] for char in piece) for piece in pieces]
    raise LMError(_UNSUPPORTED_TOKENIZER.format(kind=tokenizer.kind, target="GGUF"))


_UNSUPPORTED_TOKENIZER = (
    "exporting a {kind} tokenizer to {target} is not supported (char, word and bpe are): "
    "SentencePiece's encoder and the tokenizers library's Unigram split some texts differently"
)


def _check_tokenizer(tokenizer: Tokenizer, target: str) -> None:
    """Refuse, before writing anything, a tokenizer kind the export cannot carry exactly."""
    if not isinstance(tokenizer, (VocabTokenizer, BPETokenizer)):
        raise LMError(_UNSUPPORTED_TOKENIZER.format(kind=tokenizer.kind, target=target))


def special_tokens(tokenizer: Tokenizer) -> dict[int, str]:
    """Ids that stand for no text (unknown, control), by name: control tokens in the GGUF."""
    if isinstance(tokenizer, VocabTokenizer):
        return {0: UNK}
    return {}


def add_gguf_vocabulary(writer, tokenizer: Tokenizer) -> None:
    """The vocabulary as llama.cpp's byte-trie tokenizer ("rwkv"): id i is exactly our token i.

    Each token's text is its bytes, escaped as llama.cpp unescapes them; no BOS or EOS is
    declared (lm's models have none; llama.cpp's BPE tokenizer would assume id 11 ends the
    text). llama.cpp splits text by longest match over the vocabulary: exactly lm's ids for
    char vocabularies; for word and BPE vocabularies prompts may split
    differently (pass token ids for an exact match). <unk> (id 0 of char and word
    vocabularies) stands for no text: a control token under its name, which llama.cpp
    prints only when asked for special tokens.
    """
    import gguf

    pieces = token_bytes(tokenizer)
    texts = [_escape_rwkv(piece) for piece in pieces]
    types = [gguf.TokenType.NORMAL] * len(pieces)
    specials = special_tokens(tokenizer)
    for token_id, name in specials.items():
        texts[token_id], types[token_id] = name, gguf.TokenType.CONTROL
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list(texts)
    writer.add_token_types(types)
    unknown = [i for i, name in specials.items() if name == UNK]
    if unknown:
        writer.add_unk_token_id(unknown[0])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def _escape_rwkv(piece: bytes) -> str:
    """A token's bytes as llama.cpp's rwkv vocabulary text (\\n, \\t, \\r, \\\\ and \\xNN)."""
    named = {ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r", ord("\\"): "\\\\"}
    text = []
    for byte in piece:
        if byte in named:
            text.append(named[byte])
        elif 0x20 <= byte < 0x7F:
            text.append(chr(byte))
        else:
            text.append(f"\\x{byte:02x}")
    return "".join(text)


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the ByteLevel pre-tokenizer's alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
