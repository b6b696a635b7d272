"""The HTTP layer's wiring: settings, served models, middleware, error handlers and routers.

One engine (and scheduler thread) per served checkpoint. The event loop never runs model
work: the engine thread hands each step's outputs to the loop in one call. `run` is the
whole of `lm serve`: load, wire, listen, drain.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from lm.checkpoint import Checkpoint
from service.errors import add_error_handlers
from service.loader import load_checkpoints, start_engines
from service.metrics import Metrics, engine_counts
from service.middleware import BodySizeLimit, BodyTimeout, RequestId
from service.protocol import with_header_timeout
from service.routes import (
    chat,
    completions,
    embeddings,
    health,
    metrics,
    models,
    playground,
    tokenize,
)
from service.settings import Settings


def create_app(
    settings: Settings | None = None, checkpoints: list[Checkpoint] | None = None
) -> FastAPI:
    """The FastAPI app. `checkpoints` may be given pre-loaded (`run`, tests); else they
    are loaded from `settings` at start-up."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.draining = False  # the app may be started again after a shutdown (tests)
        loaded = checkpoints if checkpoints is not None else load_checkpoints(settings)
        app.state.models.clear()
        app.state.models.update(start_engines(loaded, settings, asyncio.get_running_loop()))
        # Everything alive now (the libraries, the models) lives as long as the server:
        # out of the collector's sight. Otherwise each full collection walks all of it and
        # stops the event loop and the engine for ~200 ms, to free nothing (measured: a
        # wave of 64 few-shot requests got its first tokens 0.2 s later).
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # an app started again in this process (tests) frees its own
            app.state.draining = True
            for served in app.state.models.values():
                served.engine.shutdown(timeout=0.0)

    app = FastAPI(
        title="lm",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions for small language models.",
    )
    app.state.settings = settings
    app.state.models = {}
    app.state.draining = False
    app.state.metrics = Metrics(
        lambda: {
            name: engine_counts(m.engine)
            for name, m in app.state.models.items()
            if not m.adapter  # an adapter's requests run in its base's engine
        }
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(BodyTimeout, seconds=settings.body_timeout)
    app.add_middleware(RequestId)  # outermost: every response carries the id, errors too
    add_error_handlers(app)
    for group in (health, metrics, models, completions, chat, tokenize, embeddings, playground):
        app.include_router(group.router)
    return app


def run(settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM (running requests get `shutdown_timeout` to finish)."""
    import uvicorn

    from lm import native
    from lm.device import resolve_kv_cache_dtype
    from lm.native.decode import decode_matrices

    checkpoints = load_checkpoints(settings)  # sets the thread counts before tensor work
    gc.collect()  # loading's garbage, before the start-up freezes what is left (`lifespan`)
    app = create_app(settings, checkpoints)
    device = next(checkpoints[0].model.parameters()).device if checkpoints else "none"
    kernel = "PyTorch decode"
    if getattr(device, "type", None) == "cpu" and native.decode_attention():
        matrices = decode_matrices(settings.decode_matrices)
        kernel = "native decode" + (f", {matrices} products" if matrices != "float32" else "")
    caches = {
        str(dtype).removeprefix("torch.")
        for c in checkpoints
        if (dtype := resolve_kv_cache_dtype(c.model, device, settings.kv_cache_dtype))
    }
    if caches:
        kernel += f", {'/'.join(sorted(caches))} KV cache"
    print(
        f"lm serve: {', '.join(_described(c) for c in checkpoints)} on "
        f"http://{settings.host}:{settings.port} (device {device}, max batch "
        f"{settings.max_batch}, {kernel})",
        file=sys.stderr,
    )
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found:
    # with the default one the process would die by the signal (exit -15) after a clean drain.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.shutdown_timeout or None,
        http=with_header_timeout(settings.header_timeout),
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=settings.keep_alive_timeout,
    )
    draining_server(config).run()
    return 0


def draining_server(config):
    """A uvicorn server whose app reports "draining" (/health: 503) from the moment a
    SIGINT or SIGTERM arrives, while running requests finish."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            self.config.app.state.draining = True
            super().handle_exit(sig, frame)

    return DrainingServer(config)


def _described(checkpoint: Checkpoint) -> str:
    """A served checkpoint's name, with the LoRA adapters served in its batches."""
    adapters = checkpoint.meta.get("adapters")
    return f"{checkpoint.name} (adapters {', '.join(adapters)})" if adapters else checkpoint.name


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
