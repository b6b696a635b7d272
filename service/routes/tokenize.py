"""POST /tokenize, POST /detokenize, GET /tokenizer_info: vLLM's shapes (what
lm-evaluation-harness's remote tokenizer calls)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service import chat
from service.deps import check_key, detokenize_model, find_model, get_settings, tokenize_model
from service.errors import APIError
from service.loader import ServedModel
from service.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from service.settings import Settings

router = APIRouter(dependencies=[Depends(check_key)])

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413)}


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(
    body: TokenizeRequest,
    served: ServedModel = Depends(tokenize_model),
    settings: Settings = Depends(get_settings),
):
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "prompt: give either prompt or messages", param="prompt")
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = chat.render(messages, served, body.add_generation_prompt, settings)
    else:
        text = body.prompt
        if len(text) > settings.max_prompt_chars:
            raise APIError(
                413,
                f"prompt: longer than {settings.max_prompt_chars} characters",
                param="prompt",
                code="prompt_too_long",
            )
    tokenizer = served.checkpoint.tokenizer
    tokens = tokenizer.encode(text) if text else []
    strs = [tokenizer.id_to_token(t) for t in tokens] if body.return_token_strs else None
    return TokenizeResponse(
        count=len(tokens), max_model_len=served.engine.context_size, tokens=tokens, token_strs=strs
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, served: ServedModel = Depends(detokenize_model)):
    vocab = served.engine.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"tokens: token ids must be in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=served.checkpoint.tokenizer.decode(body.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=_ERRORS)
async def tokenizer_info(request: Request, model: str | None = None):
    served = find_model(request, model)
    template = served.chat_template
    return TokenizerInfo(
        tokenizer_class=type(served.checkpoint.tokenizer).__name__,
        vocab_size=served.engine.vocab_size,
        model_max_length=served.engine.context_size,
        eos_token=template.eos_token or None,
        bos_token=template.bos_token or None,
        chat_template=template.source,
    )
