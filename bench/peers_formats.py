"""The model in every peer's format, cached: transformers folder, GGUF, CTranslate2; and
llama.cpp's binaries (bench/peers.py).

Exports are made by lm's own exporter (`lm export`) and cached under
~/.cache/lm/peers/<weights hash>/; the CTranslate2 helpers here are shared by the greedy
agreement check and the timing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.common import save_reference_gpt

CACHE = Path(os.environ.get("LM_PEERS_CACHE", Path.home() / ".cache" / "lm" / "peers"))
REFERENCE = "reference"
LLAMA_TARGETS = ("llama-simple", "llama-batched-bench", "llama-server")
CT2_TYPES = ("float32", "int8")


@dataclass(frozen=True)
class Exports:
    """One checkpoint in every peer's format (paths inside the cache)."""

    checkpoint: Path
    hf: Path
    gguf: Path
    ct2: dict[str, Path]  # by compute type


def weights_hash(checkpoint: Path) -> str:
    """The first 16 hex digits of the sha256 of the checkpoint's weights file."""
    digest = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    return digest[:16]


def reference_checkpoint() -> Path:
    """The other benchmarks' reference GPT (4x128 char, block 256, seed 0), saved once."""
    directory = CACHE / "reference-gpt"
    if (directory / "model.safetensors").is_file():
        return directory
    return save_reference_gpt(directory)


def checkpoint_dir(name: str) -> Path:
    """A checkpoint's directory: `reference`, a shipped name or a path."""
    if name == REFERENCE:
        return reference_checkpoint()
    from lm.checkpoint import load_checkpoint

    return load_checkpoint(name).path


def export_all(checkpoint: Path) -> Exports:
    """Export `checkpoint` (lm export: hf and gguf) and convert to CTranslate2, once."""
    from lm.export import export

    folder = CACHE / weights_hash(checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    exports = Exports(
        checkpoint=checkpoint,
        hf=folder / "hf",
        gguf=folder / "model.gguf",
        ct2={kind: folder / f"ct2-{kind}" for kind in CT2_TYPES},
    )
    if not exports.hf.is_dir():
        _atomically(exports.hf, lambda tmp: export(checkpoint, tmp, "hf"))
    if not exports.gguf.is_file():
        _atomically(exports.gguf, lambda tmp: export(checkpoint, tmp, "gguf"))
    for kind, path in exports.ct2.items():
        if not path.is_dir():
            _atomically(path, lambda tmp, kind=kind: convert_ct2(exports.hf, tmp, kind))
    return exports


def _atomically(target: Path, write) -> None:
    """Call write(tmp) on a temporary path beside `target`, then rename it into place."""
    tmp = target.with_name(target.name + ".partial")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    write(tmp)
    tmp.rename(target)


def convert_ct2(hf: Path, out: Path, quantization: str) -> None:
    """Convert a transformers folder to CTranslate2 (what ct2-transformers-converter does).

    lm's vocabularies declare no BOS, EOS or unknown token, which CTranslate2 must name: all
    three become id 0 (<unk> in char and word vocabularies), and generation passes
    min_length so that this "end" token is never taken.
    """
    ctranslate2 = _import_ctranslate2()
    converter = ctranslate2.converters.TransformersConverter(str(hf))
    converter.convert(str(out), quantization=quantization)
    config = json.loads((out / "config.json").read_text())
    first = ct2_vocabulary(out)[0]
    for name in ("bos_token", "eos_token", "unk_token"):
        config[name] = config.get(name) or first
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _import_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise SystemExit("CTranslate2 is missing: pip install 'lm[bench]'") from None
    return ctranslate2


def build_llama_cpp() -> dict[str, Path]:
    """llama.cpp's simple, batched-bench and server binaries, built once."""
    from bench.llamacpp_check import build_llama_cpp as build

    return build(LLAMA_TARGETS)


def ct2_generator(path: Path, compute_type: str, threads: int):
    """A CTranslate2 generator on the CPU with `threads` threads for one batch."""
    ctranslate2 = _import_ctranslate2()
    return ctranslate2.Generator(
        str(path), device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
    )


def ct2_vocabulary(path: Path) -> list[str]:
    """A converted model's token strings by id."""
    return json.loads((path / "vocabulary.json").read_text(encoding="utf-8"))


def ct2_generate(generator, vocabulary, prompts: list[list[int]], new_tokens: int) -> list:
    """CTranslate2's greedy continuations of a batch of token-id prompts, as ids."""
    results = generator.generate_batch(
        [[vocabulary[i] for i in ids] for ids in prompts],
        max_length=new_tokens,
        min_length=new_tokens,
        sampling_topk=1,
        include_prompt_in_result=False,
    )
    return [list(result.sequences_ids[0]) for result in results]
