"""llama.cpp runs lm's exported GGUF with lm's greedy continuation (issue 15).

Builds llama.cpp once from the llama-cpp-python source package (its vendor/llama.cpp,
`llama-simple` only; cached under ~/.cache/lm/llama.cpp/), exports a checkpoint with
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
from pathlib import Path

CACHE = Path(os.environ.get("LM_LLAMACPP_CACHE", Path.home() / ".cache" / "lm" / "llama.cpp"))
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF",
               "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]


def source_dir() -> Path:
    """Unpack llama-cpp-python's source package (downloaded once with pip) and return its llama.cpp."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sdists = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                        "--no-deps", "llama-cpp-python", "-d", str(CACHE)], check=True)
        sdists = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    sdist = sdists[-1]
    root = CACHE / sdist.name.removesuffix(".tar.gz")
    if not root.is_dir():
        with tarfile.open(sdist) as archive:
            archive.extractall(CACHE, filter="data")
    return root / "vendor" / "llama.cpp"


def build_llama_simple() -> Path:
    """Build llama.cpp's `llama-simple` (Release, native) once; return the binary's path."""
    src = source_dir()
    build = CACHE / "build"
    binary = build / "bin" / "llama-simple"
    if binary.is_file():
        return binary
    nice = ["nice", "-n", "15"]
    subprocess.run(nice + ["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], check=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(nice + ["cmake", "--build", str(build), "--target", "llama-simple",
                           "-j", jobs], check=True)
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-only", action="store_true")
    args, _ = parser.parse_known_args()
    binary = build_llama_simple()
    print(f"llama-simple: {binary}")
    if args.build_only:
        return


if __name__ == "__main__":
    main()
