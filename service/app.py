"""The HTTP layer: translates OpenAI-style requests into engine calls and back.

One engine (and scheduler thread) per served checkpoint. The event loop never runs model
work: the engine thread hands each step's outputs to the loop in one call.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lm.checkpoint import Checkpoint, load_checkpoint
from lm.embeddings import mean_hidden_embedding
from lm.engine import Engine, EngineStopped, Output, QueueFull, SamplingParams, Sequence
from lm.errors import LMError
from lm.fewshot import DEFAULT_TEMPLATE, Example, build_prompt
from lm.generate import encode_prompt
from service.metrics import Metrics
from service.schemas import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorResponse,
    Health,
    Logprobs,
    ModelCard,
    ModelList,
    Usage,
)
from service.settings import Settings

# One server-sent event of a streamed completion (FastAPI's own notation for event streams).
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a completion chunk as JSON; `[DONE]` at the end"},
}}


class APIError(Exception):
    """An error to send as an OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class ServedModel:
    name: str
    checkpoint: Checkpoint
    engine: Engine
    created: int


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
        import torch

        from lm.train import pick_device

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
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
                            max_queue=settings.max_queue, notify=notify)
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
        params, prompts, prompt_ids = _prepare(body, served)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        outputs: asyncio.Queue = asyncio.Queue()
        sequences: list[Sequence] = []
        try:
            for p_index, ids in enumerate(prompt_ids):
                for s_index in range(body.n):
                    choice = p_index * body.n + s_index
                    seed = None if body.seed is None else (body.seed + s_index) & ((1 << 63) - 1)
                    choice_params = SamplingParams(**{**params.__dict__, "seed": seed})

                    def sink(out, _choice=choice):
                        outputs.put_nowait((_choice, out))

                    sequences.append(served.engine.submit(ids, choice_params, sink,
                                                          stream=body.stream))
        except QueueFull as exc:
            for seq in sequences:
                seq.cancel()
            metrics.rejected.labels(served.name).inc()
            raise APIError(429, f"{exc}; retry shortly", type_="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineStopped as exc:
            for seq in sequences:
                seq.cancel()
            raise APIError(503, str(exc), type_="server_error", code="shutting_down",
                           headers={"Retry-After": "5"}) from None

        context = _Context(served, body, request_id, created, prompts, prompt_ids, sequences,
                           outputs)
        if body.stream:
            return StreamingResponse(_stream(context), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        return await _complete(context, request)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse,
              responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413)})
    async def embeddings(body: EmbeddingRequest, _key: None = Depends(check_key)):
        """The mean of the model's final hidden states over each input's tokens."""
        served = pick_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise APIError(400, "input: must not be an empty list", param="input")
        if len(texts) > settings.max_prompts:
            raise APIError(400, f"input: at most {settings.max_prompts} texts per request",
                           param="input")
        for text in texts:
            if not text:
                raise APIError(400, "input: texts must not be empty", param="input")
            if len(text) > settings.max_prompt_chars:
                raise APIError(413, f"input: longer than {settings.max_prompt_chars} characters",
                               param="input", code="prompt_too_long")
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

    def _prepare(body: CompletionRequest, served: ServedModel):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt: must not be an empty list", param="prompt")
        if len(prompts) > settings.max_prompts:
            raise APIError(400, f"prompt: at most {settings.max_prompts} prompts per request",
                           param="prompt")
        if body.n * len(prompts) > settings.max_n:
            raise APIError(400, f"n: at most {settings.max_n} completions per request "
                                f"(prompts x n), got {body.n * len(prompts)}", param="n")
        max_tokens = body.max_tokens
        if "max_tokens" not in body.model_fields_set:  # the default must fit a lower limit
            max_tokens = min(max_tokens, settings.max_tokens_limit)
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens: at most {settings.max_tokens_limit}, "
                                f"got {max_tokens}", param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > settings.max_stop:
            raise APIError(400, f"stop: at most {settings.max_stop} sequences", param="stop")
        if any(not s for s in stop):
            raise APIError(400, "stop: sequences must not be empty", param="stop")
        if any(len(s) > settings.max_stop_chars for s in stop):
            raise APIError(400, f"stop: each sequence at most {settings.max_stop_chars} characters",
                           param="stop")
        if body.examples is not None or body.template is not None:
            if not body.examples:
                raise APIError(400, "examples: at least one example is needed for a few-shot "
                                    "request", param="examples")
            examples = [Example(e.input, e.output) for e in body.examples]
            built = []
            for query in prompts:
                try:
                    text, default_stop = build_prompt(examples, query,
                                                      body.template or DEFAULT_TEMPLATE)
                except LMError as exc:
                    message = str(exc)
                    param = ("examples" if message.startswith("example") else
                             "prompt" if message.startswith("the query") else "template")
                    raise APIError(400, f"{param}: {message}", param=param) from None
                built.append(text)
            prompts = built
            stop = stop or default_stop
        for text in prompts:
            if not text:
                raise APIError(400, "prompt: must not be empty", param="prompt")
            if len(text) > settings.max_prompt_chars:
                raise APIError(413, f"prompt: longer than {settings.max_prompt_chars} characters",
                               param="prompt", code="prompt_too_long")
        params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature,
                                top_k=body.top_k, top_p=body.top_p, stop=stop,
                                logprobs=body.logprobs)
        prompt_ids = [encode_prompt(served.checkpoint, text) for text in prompts]
        return params, prompts, prompt_ids

    @dataclass
    class _Context:
        served: ServedModel
        body: CompletionRequest
        request_id: str
        created: int
        prompts: list[str]
        prompt_ids: list[list[int]]
        sequences: list[Sequence]
        outputs: asyncio.Queue

        def usage(self) -> Usage:
            prompt = sum(len(ids) for ids in self.prompt_ids)
            completion = sum(len(seq.generated) for seq in self.sequences)
            return Usage(prompt_tokens=prompt, completion_tokens=completion,
                         total_tokens=prompt + completion)

        def logprobs(self, out: Output, offset: int) -> Logprobs | None:
            if self.body.logprobs is None or out.logprobs is None:
                return None
            tokenizer = self.served.checkpoint.tokenizer
            tokens = [tokenizer.id_to_token(t) for t in out.token_ids]
            offsets, position = [], offset
            for token in tokens:
                offsets.append(position)
                position += len(token)
            top = None
            if self.body.logprobs > 0 and out.top_logprobs is not None:
                top = [{tokenizer.id_to_token(t): v for t, v in row} for row in out.top_logprobs]
            return Logprobs(tokens=tokens, token_logprobs=list(out.logprobs), top_logprobs=top,
                            text_offset=offsets)

    def _finish_reason(out: Output) -> str:
        return "stop" if out.finish_reason == "stop" else "length"

    async def _complete(ctx: _Context, request: Request) -> CompletionResponse | Response:
        pending = len(ctx.sequences)
        texts = [""] * pending
        parts: list[list[Output]] = [[] for _ in range(pending)]
        finals: list[Output | None] = [None] * pending
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while pending:
                getter = asyncio.ensure_future(ctx.outputs.get())
                done, _ = await asyncio.wait({getter, disconnect},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:  # the client left: nobody reads this response
                    getter.cancel()
                    return Response(status_code=499)  # nginx's "client closed request"
                choice, out = getter.result()
                texts[choice] += out.text
                parts[choice].append(out)
                if out.finish_reason is not None:
                    finals[choice] = out
                    pending -= 1
                    _observe(ctx, out, streamed=False)
        finally:
            disconnect.cancel()
            for seq in ctx.sequences:
                if not seq.finished:
                    seq.cancel()
        choices = []
        for choice, text in enumerate(texts):
            prefix = ctx.prompts[choice // ctx.body.n] if ctx.body.echo else ""
            merged = _merge(parts[choice])
            choices.append(CompletionChoice(
                text=prefix + text, index=choice,
                logprobs=ctx.logprobs(merged, len(prefix)),
                finish_reason=_finish_reason(finals[choice])))
        return CompletionResponse(id=ctx.request_id, created=ctx.created, model=ctx.served.name,
                                  choices=choices, usage=ctx.usage())

    async def _stream(ctx: _Context) -> AsyncIterator[str]:
        pending = len(ctx.sequences)
        offsets = [0] * pending
        last_time = [None] * pending
        try:
            if ctx.body.echo:
                for choice in range(pending):
                    prompt = ctx.prompts[choice // ctx.body.n]
                    offsets[choice] = len(prompt)
                    yield _sse(ctx, choice, prompt, None, None)
            while pending:
                choice, out = await ctx.outputs.get()
                # Coalesce whatever else is ready into the same write.
                batch = [(choice, out)]
                while not ctx.outputs.empty():
                    batch.append(ctx.outputs.get_nowait())
                chunks = []
                now = time.perf_counter()
                for choice, out in batch:
                    if last_time[choice] is not None:
                        metrics.itl.labels(ctx.served.name).observe(now - last_time[choice])
                    last_time[choice] = now
                    finish = _finish_reason(out) if out.finish_reason is not None else None
                    if out.text or finish is not None:
                        chunks.append(_sse(ctx, choice, out.text, ctx.logprobs(out, offsets[choice]),
                                           finish))
                    offsets[choice] += len(out.text)
                    if out.finish_reason == "error":
                        error = {"message": "generation failed on the server; see its log",
                                 "type": "server_error", "param": None, "code": None}
                        chunks.append(f"data: {json.dumps({'error': error})}\n\n")
                    if out.finish_reason is not None:
                        pending -= 1
                        _observe(ctx, out, streamed=True)
                if chunks:
                    yield "".join(chunks)
            if ctx.body.stream_options is not None and ctx.body.stream_options.include_usage:
                chunk = {"id": ctx.request_id, "object": "text_completion", "created": ctx.created,
                         "model": ctx.served.name, "choices": [],
                         "usage": ctx.usage().model_dump()}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects and the response is cancelled
            for seq in ctx.sequences:
                if not seq.finished:
                    seq.cancel()

    def _sse(ctx: _Context, choice: int, text: str, logprobs: Logprobs | None,
             finish: str | None) -> str:
        chunk = {
            "id": ctx.request_id, "object": "text_completion", "created": ctx.created,
            "model": ctx.served.name,
            "choices": [{"text": text, "index": choice,
                         "logprobs": logprobs.model_dump() if logprobs else None,
                         "finish_reason": finish}],
        }
        return f"data: {json.dumps(chunk)}\n\n"

    def _observe(ctx: _Context, out: Output, streamed: bool) -> None:
        if out.timings is not None and out.finish_reason != "cancelled":
            metrics.observe_finished(ctx.served.name, out.timings, out.finish_reason, streamed)

    return app


def _merge(parts: list[Output]) -> Output:
    """One output from a sequence's pieces (non-streaming requests get one piece anyway)."""
    if len(parts) == 1:
        return parts[0]
    logprobs = None if parts[0].logprobs is None else [x for p in parts for x in p.logprobs]
    top = None if parts[0].top_logprobs is None else [x for p in parts for x in p.top_logprobs]
    return Output(text="".join(p.text for p in parts),
                  token_ids=[t for p in parts for t in p.token_ids], logprobs=logprobs,
                  finish_reason=parts[-1].finish_reason, timings=parts[-1].timings,
                  top_logprobs=top)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
