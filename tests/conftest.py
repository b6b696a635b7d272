"""Shared fixtures: one CPU thread, a small synthetic corpus, the reference corpus."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from bench.common import environment

_SUBJECTS = ["The king", "A young poet", "My good lord", "The old sailor", "Her sister", "We"]
_VERBS = ["speaks of", "remembers", "walks toward", "cannot forget", "sings about", "defends"]
_OBJECTS = [
    "the quiet sea",
    "a broken sword",
    "the northern hills",
    "his father's house",
    "the winter rain",
    "a letter, sealed and lost",
    "the crown",
    "our small garden",
]
_ENDINGS = [".", "!", "?", ";", ", and so it goes.", "."]


def make_corpus(n_sentences: int = 120, seed: int = 0) -> str:
    """English-like text with punctuation and line breaks, the same on every call."""
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_sentences):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        line.append(sentence + rng.choice(_ENDINGS))
        if rng.random() < 0.3:
            lines.append(" ".join(line))
            line = []
            if rng.random() < 0.2:
                lines.append("")
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread, and leave the other core alone."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Token files go to a temporary cache, never the user's (subprocesses inherit it)."""
    with environment("LM_CACHE_DIR", str(tmp_path_factory.mktemp("lm-cache"))):
        yield


@pytest.fixture(autouse=True, scope="session")
def _float32_decode():
    """The native decode step multiplies in float32, as the PyTorch path it is checked
    against, unless a test asks for its bfloat16 products (`LM_BF16_DECODE`, on by default
    where the CPU has them: tests/test_native_decode.py covers that mode; subprocesses
    inherit the setting)."""
    from lm.native import decode

    with environment("LM_BF16_DECODE", "0", decode.bf16_decode):
        yield


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return make_corpus()


@pytest.fixture
def corpus_path(tmp_path: Path, corpus_text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


@pytest.fixture
def shakespeare_path() -> Path:
    default = Path(__file__).resolve().parents[1] / "data"
    path = Path(os.environ.get("LM_DATA_DIR", default)) / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"reference corpus not found at {path} (set LM_DATA_DIR)")
    return path


# -- a tiny checkpoint and live servers (the HTTP tests) ----------------------------------


def save_tiny_gpt(
    directory: Path, text: str, block_size: int = 64, training: dict | None = None
) -> Path:
    """An untrained 1-layer char GPT (random weights) saved as a checkpoint."""
    from lm.checkpoint import save_checkpoint
    from lm.models import ModelConfig, build_model
    from lm.tokenizers import CharTokenizer

    tokenizer = CharTokenizer.train(text)
    torch.manual_seed(0)
    config = ModelConfig(
        kind="gpt",
        vocab_size=tokenizer.vocab_size,
        n_layer=1,
        n_embd=32,
        n_head=2,
        block_size=block_size,
    )
    model = build_model(config)
    with torch.no_grad():  # larger random weights: varied, not near-uniform, predictions
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    save_checkpoint(directory, model, tokenizer, training)
    return directory


@pytest.fixture(scope="session")
def tiny_gpt_saver():
    """`save_tiny_gpt`, for test modules (they do not import conftest)."""
    return save_tiny_gpt


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory, corpus_text: str) -> Path:
    """Served under the model name "tiny" (the directory's name)."""
    return save_tiny_gpt(tmp_path_factory.mktemp("checkpoints") / "tiny", corpus_text)


class LiveServer:
    """A FastAPI app run by uvicorn in a background thread on a free loopback port."""

    def __init__(self, app):
        import socket
        import threading

        import uvicorn

        self.app = app
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def start(self, timeout: float = 30.0) -> LiveServer:
        import time

        import httpx

        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"no answer from {self.url}/health after {timeout} s")

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.should_exit = True
            self.thread.join(timeout=15)
        self.socket.close()


@pytest.fixture(scope="session")
def start_server(tiny_checkpoint_dir: Path, launch):
    """Factory: a live server for `Settings(**overrides)` serving "tiny"; stopped at the end."""
    from lm.checkpoint import load_checkpoint
    from service.app import create_app
    from service.settings import Settings

    def start(**overrides) -> LiveServer:
        settings = Settings(checkpoints=[str(tiny_checkpoint_dir)], **overrides)
        return launch(create_app(settings, [load_checkpoint(tiny_checkpoint_dir)]))

    return start


@pytest.fixture(scope="session")
def live_server(start_server) -> LiveServer:
    """The default server: default settings, model "tiny"."""
    return start_server()


@pytest.fixture(scope="session")
def launch():
    """Factory: run any app on a live server; all are stopped at the end."""
    servers: list[LiveServer] = []

    def start(app) -> LiveServer:
        server = LiveServer(app).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# x86 levels below this CPU's own whose code paths the native kernels have (AVX2; AVX-512
# without BF16), with the CPU flags that running their code needs.
OLDER_X86 = {
    "x86-64-v3": {"avx2", "fma", "f16c", "bmi2"},
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}


@pytest.fixture(params=list(OLDER_X86))
def older_x86(request, tmp_path_factory, monkeypatch):
    """The native kernels built for an older x86 level (`LM_NATIVE_ARCH`; once a level, in
    its own cache directory), where this CPU runs that level's code: a machine with AVX-512
    tests its AVX2 paths too."""
    import platform

    from lm import native
    from lm.native import decode

    flags = set(native._cpu_signature().split())
    if platform.machine() not in ("x86_64", "AMD64") or not OLDER_X86[request.param] <= flags:
        pytest.skip(f"this CPU does not run {request.param} code")
    monkeypatch.setenv("LM_NATIVE_ARCH", request.param)
    directory = tmp_path_factory.getbasetemp() / f"native-{request.param}"
    monkeypatch.setenv("LM_CACHE_DIR", str(directory))
    monkeypatch.delenv("LM_NATIVE", raising=False)
    caches = (native.decode_attention, decode.decode_step, decode.generate_step, decode.draw)
    caches += (decode.bf16_weights, decode.i8_weights, decode.bf16_decode)
    for function in caches:
        function.cache_clear()
    yield request.param
    for function in caches:
        function.cache_clear()
