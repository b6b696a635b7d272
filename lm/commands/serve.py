"""`lm serve`: serve checkpoints over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import sys

from lm.commands._args import non_negative_int, positive_int
from lm.errors import LMError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve checkpoints over an OpenAI-compatible HTTP API",
        description="Every flag also reads from an LM_* environment variable "
        "(LM_HOST, LM_PORT, LM_CHECKPOINTS, LM_API_KEY, ...).",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        help="shipped name or directory (repeatable; default shakespeare-char-gpt)",
    )
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default 8000")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-batch", type=positive_int, default=None, help="sequences per step (64)")
    p.add_argument(
        "--max-queue", type=non_negative_int, default=None, help="waiting requests before 429 (256)"
    )
    p.add_argument("--max-tokens-limit", type=positive_int, default=None)
    p.add_argument("--max-body-bytes", type=positive_int, default=None)
    p.add_argument("--max-prompt-chars", type=positive_int, default=None)
    p.add_argument(
        "--cors-origin",
        action="append",
        default=None,
        dest="cors_origins",
        help="allow browser calls from this origin (repeatable; default none)",
    )
    p.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    p.add_argument(
        "--torch-threads",
        type=positive_int,
        default=None,
        help="model CPU threads (default: one per core)",
    )
    p.add_argument(
        "--stream-interval",
        type=positive_int,
        default=None,
        help="generated tokens per streamed chunk (default 1: every token; more "
        "means fewer, larger server-sent events for less CPU per token)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default=None,
        choices=("auto", "float32", "float16", "bfloat16"),
        help="GPT KV cache precision (default auto: bfloat16 on the CPU when the "
        "native attention kernel is built, else the model's)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=None,
        help="seconds to finish running requests on SIGTERM (30)",
    )
    p.add_argument("--log-level", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    import signal

    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings

    overrides = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("func", "command", "checkpoint")
    }
    if args.checkpoint:
        overrides["checkpoints"] = args.checkpoint
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise LMError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    from lm.checkpoint import load_checkpoint
    from lm.device import pick_device, serving_threads

    # Before any tensor work here: the engines' threads run the models (see serving_threads).
    serving_threads(settings.torch_threads)
    device = pick_device(settings.device)
    checkpoints = [load_checkpoint(name, device) for name in settings.checkpoints]
    names = [c.name for c in checkpoints]
    if len(set(names)) != len(names):
        raise LMError(f"two checkpoints share a name: {names}")
    app = create_app(settings, checkpoints)
    from lm import native

    kernel = "native" if device.type == "cpu" and native.decode_attention() else "PyTorch"
    print(
        f"lm serve: {', '.join(names)} on http://{settings.host}:{settings.port} "
        f"(device {device}, max batch {settings.max_batch}, {kernel} decode attention)",
        file=sys.stderr,
    )
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found:
    # with the default one the process would die by the signal (exit -15) after a clean drain.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.shutdown_timeout or None,
    )
    return 0


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
