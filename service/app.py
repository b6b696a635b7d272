"""The HTTP layer: translates OpenAI-style requests into engine calls and back.

One engine (and scheduler thread) per served checkpoint. The event loop never runs model
work: the engine thread hands each step's outputs to the loop in one call.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lm.checkpoint import Checkpoint, load_checkpoint
from lm.device import pick_device, serving_threads
from lm.embeddings import mean_hidden_embedding
from lm.engine import Engine, Output, Sequence
from service.completions import ServedModel, check_lengths, complete, stream, submit, text_list
from service.errors import APIError, error_response
from service.metrics import Metrics
from service.routes import playground
from service.schemas import (
    CompletionRequest,
    CompletionResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)
from service.settings import Settings

# One server-sent event of a streamed completion (FastAPI's own notation for event streams).
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a completion chunk as JSON; `[DONE]` at the end"},
}}


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413, whether or not they declare a length."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._refuse(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, f"request body exceeds {self.max_bytes} bytes",
                                  code="request_too_large")
        await response(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    """An HTTPException, so that FastAPI's body parsing re-raises it as it is (it turns any
    other exception raised while reading the body into a 400)."""


def create_app(settings: Settings | None = None, checkpoints: list[Checkpoint] | None = None) -> FastAPI:
    """The FastAPI app. `checkpoints` may be given pre-loaded (tests); else from settings."""
    settings = settings or Settings()
    models: dict[str, ServedModel] = {}
    state = {"draining": False}

    def engine_counts() -> dict[str, tuple[int, int]]:
        return {name: (m.engine.num_running, m.engine.num_waiting) for name, m in models.items()}

    metrics = Metrics(engine_counts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threads = serving_threads(settings.torch_threads)
        loop = asyncio.get_running_loop()
        device = pick_device(settings.device)
        state["draining"] = False  # the app may be started again after a shutdown (tests)
        models.clear()
        loaded = checkpoints if checkpoints is not None else [
            load_checkpoint(name, device) for name in settings.checkpoints
        ]
        for ckpt in loaded:
            name = ckpt.name

            def notify(events, _loop=loop):
                _loop.call_soon_threadsafe(_dispatch, events)

            engine = Engine(ckpt.model, ckpt.tokenizer, max_batch=settings.max_batch,
                            max_queue=settings.max_queue, notify=notify, threads=threads,
                            stream_interval=settings.stream_interval,
                            kv_cache_dtype=settings.kv_cache_dtype
                            if getattr(ckpt.model, "context_size", None) else "auto")
            engine.start()
            models[name] = ServedModel(name, ckpt, engine, int(time.time()))
        try:
            yield
        finally:
            state["draining"] = True
            for served in models.values():
                served.engine.shutdown(timeout=0.0)

    app = FastAPI(title="lm", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions for small language models.")
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.state.settings = settings
    app.state.models = models
    app.state.metrics = metrics
    app.include_router(playground.router)

    # -- errors ---------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = loc[0] if loc else None
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif not loc and first.get("type") in ("model_attributes_type", "dict_type"):
            message = "the request body must be a JSON object"
        else:
            where = ".".join(loc) if loc else "body"
            message = f"{where}: {first.get('msg', 'invalid value')}"
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed",
                413: "request_too_large"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: never leak a traceback
        return error_response(500, "internal error", type_="server_error")

    # -- helpers --------------------------------------------------------------------------

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        expected = settings.api_key.get_secret_value()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    def pick_model(name: str | None) -> ServedModel:
        if name is None:
            return next(iter(models.values()))
        if name not in models:
            raise APIError(404, f"model {name!r} not found; served: {', '.join(models)}",
                           param="model", code="model_not_found")
        return models[name]

    def _dispatch(events: list[tuple[Sequence, Output]]) -> None:
        for seq, out in events:
            seq.sink(out)

    # -- routes ---------------------------------------------------------------------------

    @app.get("/health", response_model=Health,
             responses={503: {"model": Health, "description": "shutting down"}})
    async def health():
        running = sum(m.engine.num_running for m in models.values())
        waiting = sum(m.engine.num_waiting for m in models.values())
        body = Health(status="draining" if state["draining"] else "ok", models=list(models),
                      running=running, waiting=waiting)
        return JSONResponse(body.model_dump(), status_code=503 if state["draining"] else 200)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList,
             responses={401: {"model": ErrorResponse}})
    async def list_models(request: Request, _key: None = Depends(check_key)):
        return ModelList(data=[
            ModelCard(id=m.name, created=m.created, kind=m.checkpoint.config.kind,
                      tokenizer=m.checkpoint.tokenizer.kind,
                      num_params=m.checkpoint.model.num_params(),
                      context_size=m.checkpoint.model.context_size)
            for m in models.values()
        ])

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={200: {"content": {"text/event-stream": {"itemSchema": _SSE_EVENT}},
                               "description": "a completion; with `stream`, server-sent "
                                              "events instead"},
                         **{code: {"model": ErrorResponse}
                            for code in (400, 401, 404, 413, 429, 503)}})
    async def completions(body: CompletionRequest, request: Request,
                          _key: None = Depends(check_key)):
        served = pick_model(body.model)
        job = submit(body, served, settings, metrics)
        if body.stream:
            return StreamingResponse(stream(job, metrics), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        return await complete(job, request, metrics)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse,
              responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413)})
    async def embeddings(body: EmbeddingRequest, _key: None = Depends(check_key)):
        """The mean of the model's final hidden states over each input's tokens."""
        served = pick_model(body.model)
        texts = text_list(body.input, "input", settings)
        check_lengths(texts, "input", settings)
        ids = [served.checkpoint.tokenizer.encode(text) for text in texts]
        if any(not seq for seq in ids):
            raise APIError(400, "input: a text encodes to no tokens", param="input")
        vectors = await run_in_threadpool(mean_hidden_embedding, served.checkpoint.model, ids)
        data = []
        for index, vector in enumerate(vectors):
            if body.encoding_format == "base64":
                encoded = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
                data.append(Embedding(embedding=encoded, index=index))
            else:
                data.append(Embedding(embedding=vector.tolist(), index=index))
        tokens = sum(len(seq) for seq in ids)
        return EmbeddingResponse(data=data, model=served.name,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    return app
