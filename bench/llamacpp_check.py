"""llama.cpp runs lm's exported GGUF with lm's greedy continuation (issue 15).

Builds llama.cpp once from the llama-cpp-python source package (its vendor/llama.cpp,
`llama-simple` here; bench/peers.py adds its bench and server; cached under
~/.cache/lm/llama.cpp/), exports a checkpoint with
`lm export --format gguf`, runs it greedily in llama.cpp and compares the continuation
with lm's greedy one on the same prompt.

    python -m bench.llamacpp_check [--checkpoint checkpoints/shakespeare-char-gpt]
                                   [--prompt "ROMEO:"] [--new-tokens 200] [--build-only]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("LM_LLAMACPP_CACHE", Path.home() / ".cache" / "lm" / "llama.cpp"))
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=ON",  # llama-server, for bench/peers.py (built only when asked)
]


def source_dir() -> Path:
    """Unpack llama-cpp-python's source package (downloaded once with pip) and return its llama.cpp."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sdists = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "llama-cpp-python",
                "-d",
                str(CACHE),
            ],
            check=True,
        )
        sdists = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    sdist = sdists[-1]
    root = CACHE / sdist.name.removesuffix(".tar.gz")
    if not root.is_dir():
        with tarfile.open(sdist) as archive:
            archive.extractall(CACHE, filter="data")
    return root / "vendor" / "llama.cpp"


def build_llama_cpp(targets: tuple[str, ...] = ("llama-simple",)) -> dict[str, Path]:
    """Build llama.cpp's `targets` (Release, native) once; return each binary's path by name."""
    src = source_dir()
    build = CACHE / "build"
    binaries = {target: build / "bin" / target for target in targets}
    missing = [target for target, binary in binaries.items() if not binary.is_file()]
    if not missing:
        return binaries
    nice = ["nice", "-n", "15"]
    # configured every time something is missing: an older cache may lack the server option
    subprocess.run(nice + ["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], check=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(
        nice + ["cmake", "--build", str(build), "--target", *missing, "-j", jobs], check=True
    )
    return binaries


def build_llama_simple() -> Path:
    """Build llama.cpp's `llama-simple` once; return the binary's path."""
    return build_llama_cpp(("llama-simple",))["llama-simple"]


def lm_greedy(ckpt, prompt: str, new_tokens: int, kv_cache_dtype: str) -> str:
    """lm's greedy continuation of `prompt` (temperature 0, through the engine), as the text
    llama.cpp prints for the same ids (where <unk>, id 0, shows as "<unk>")."""
    from lm.engine import Engine, SamplingParams
    from lm.export import token_bytes

    engine = Engine(ckpt.model, ckpt.tokenizer, max_batch=1, kv_cache_dtype=kv_cache_dtype)
    seq = engine.submit(
        ckpt.tokenizer.encode(prompt), SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    )
    engine.run_until_idle()
    pieces = token_bytes(ckpt.tokenizer)
    return b"".join(pieces[i] or b"<unk>" for i in seq.generated).decode("utf-8", "replace")


def llamacpp_ids(tokenizer, text: str) -> list[int]:
    """The ids of llama.cpp's printed text for a char vocabulary ("<unk>" is id 0)."""
    ids: list[int] = []
    for i, part in enumerate(text.split("<unk>")):
        ids += ([0] if i else []) + tokenizer.encode(part)
    return ids


def llamacpp_greedy(binary: Path, gguf: Path, prompt: str, new_tokens: int) -> str:
    """llama.cpp's greedy continuation (llama-simple prints the prompt, the text and a newline)."""
    run = subprocess.run(
        [str(binary), "-m", str(gguf), "-n", str(new_tokens), prompt],
        capture_output=True,
        check=False,
    )
    if run.returncode:
        raise SystemExit(f"llama-simple failed ({run.returncode}):\n{run.stderr.decode()[-3000:]}")
    out = run.stdout.decode("utf-8")
    if not out.startswith(prompt) or not out.endswith("\n"):
        raise SystemExit(f"unexpected llama-simple output: {out!r}")
    return out[len(prompt) : -1]


def near_ties(ckpt, prompt: str, continuation: str) -> list[float]:
    """Where `continuation` leaves lm's greedy path: lm's best logit minus that of the token
    taken, at every step whose token is not lm's argmax (teacher-forced, one forward pass)."""
    prompt_ids = ckpt.tokenizer.encode(prompt)
    return near_ties_ids(ckpt, prompt_ids, llamacpp_ids(ckpt.tokenizer, continuation))


def near_ties_ids(ckpt, prompt_ids: list[int], generated: list[int]) -> list[float]:
    """`near_ties` for token ids: the logit gaps where `generated` is not lm's argmax."""
    import torch

    ids = list(prompt_ids) + list(generated)
    with torch.no_grad():
        logits = ckpt.model(torch.tensor([ids[:-1]]))[0, len(prompt_ids) - 1 :]
    taken = torch.tensor(ids[len(prompt_ids) :])
    gap = logits.max(-1).values - logits.gather(1, taken[:, None])[:, 0]
    return [float(g) for g in gap if g > 0]


def modern_checkpoints(directory: Path) -> list[Path]:
    """Tiny random-weight GPTs of modern blocks (Llama; Qwen3 with QK-norm, untied head)."""
    import torch

    from lm.checkpoint import save_checkpoint
    from lm.models import ModelConfig, build_model
    from lm.tokenizers import train_tokenizer

    text = (Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt").read_text()
    tokenizer = train_tokenizer("char", text)
    modern = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "rope_theta": 5000.0}
    paths = []
    for name, options in {
        "llama": modern,
        "qwen3": {**modern, "qk_norm": True, "tie_embeddings": False},
    }.items():
        torch.manual_seed(1)
        model = build_model(
            ModelConfig(
                vocab_size=tokenizer.vocab_size,
                n_layer=2,
                n_embd=64,
                n_head=4,
                block_size=128,
                **options,
            )
        ).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.2)
        save_checkpoint(directory / f"random-{name}", model, tokenizer)
        paths.append(directory / f"random-{name}")
    return paths


def check(binary: Path, checkpoint: str | Path, prompts: list[str], args, tmp: Path) -> int:
    """Compare llama.cpp's and lm's greedy continuations; return how many are not equal up
    to near-ties."""
    from lm.checkpoint import load_checkpoint
    from lm.export import export

    ckpt = load_checkpoint(checkpoint)
    gguf = export(checkpoint, tmp / f"{ckpt.name}.gguf", "gguf")
    print(f"{ckpt.name} ({ckpt.config.kind}, exported as {GGUF_ARCH(ckpt.config)}):")
    failures = 0
    for prompt in prompts:
        # learned positions: llama.cpp cannot slide past the context as lm does
        room = ckpt.config.block_size - len(ckpt.tokenizer.encode(prompt))
        new_tokens = min(args.new_tokens, room)
        start = time.perf_counter()
        theirs = llamacpp_greedy(binary, gguf, prompt, new_tokens)
        ours = lm_greedy(ckpt, prompt, new_tokens, args.kv_cache_dtype)
        agree = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs))
        )
        gaps = near_ties(ckpt, prompt, theirs)
        worst = max(gaps, default=0.0)
        failures += worst > args.tie
        print(
            f"  {'SAME' if theirs == ours else 'DIFFERENT'}: {agree}/{len(ours)} characters "
            f"agree ({time.perf_counter() - start:.1f}s), prompt={prompt!r}; llama.cpp's "
            f"tokens are lm's argmax but {len(gaps)}, within {worst:.4f} of lm's best logit"
        )
        print(f"    lm:        {ours!r}")
        print(f"    llama.cpp: {theirs!r}")
    return failures


def GGUF_ARCH(config) -> str:  # noqa: N802 - reads as a constant lookup
    from lm.export import architecture

    return architecture(config).gguf_arch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        help="repeatable (default: shakespeare-char-gpt)",
    )
    parser.add_argument(
        "--modern", action="store_true", help="also tiny random-weight Llama and Qwen3 exports"
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="repeatable (default: three Shakespeare openings)",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=120,
        help="at most; capped so that prompt + new tokens fit the context",
    )
    parser.add_argument(
        "--tie",
        type=float,
        default=0.01,
        help="logit gap under which lm and llama.cpp may take either token "
        "(llama.cpp's gpt2 computes GELU with tanh, lm with erf)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default="float32",
        help="lm's KV cache (serving defaults to bfloat16 on CPUs that have it)",
    )
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args()
    binary = build_llama_simple()
    print(f"llama-simple: {binary}")
    if args.build_only:
        return
    import torch

    torch.set_num_threads(1)
    prompts = args.prompt or ["ROMEO:\n", "First Citizen:\nBefore we proceed", "KING RICHARD III:"]
    failures = runs = 0
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = list(args.checkpoint or ["shakespeare-char-gpt"])
        if args.modern:
            checkpoints += modern_checkpoints(Path(tmp))
        for checkpoint in checkpoints:
            failures += check(binary, checkpoint, prompts, args, Path(tmp))
            runs += len(prompts)
    print(
        f"{runs - failures}/{runs} continuations are lm's greedy ones up to ties within "
        f"{args.tie} logits"
    )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
