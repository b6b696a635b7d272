"""Request and response shapes of the OpenAI-compatible API (they are also the OpenAPI schema).

Unknown request fields are ignored, as OpenAI's API does, so clients that send fields lm
does not use (`user`, `presence_penalty`, ...) keep working.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lm.errors import LMError
from lm.sampling import SamplingParams
from service.settings import Settings

# Request fields named differently from the sampling parameter they set.
_REQUEST_FIELD = {"max_new_tokens": "max_tokens"}


class FewShotExample(BaseModel):
    input: str = Field(min_length=1)
    output: str = Field(min_length=1)


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="model name; defaults to the first one served")
    prompt: str | list[str] = Field(..., description="text, or a list of texts")
    max_tokens: int = Field(16, ge=1, description="new tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False,
                               description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, description="0 turns it off (extension)")
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False, description=(
        "drop tokens less likely than min_p times the most likely one; 0 turns it off "
        "(vLLM's extension)"))
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    examples: list[FewShotExample] | None = Field(
        None, description="few-shot (input, output) pairs; `prompt` is then the query (extension)")
    template: str | None = Field(
        None, description="few-shot template with {input} and {output} (extension)")

    def to_sampling_params(self, settings: Settings) -> SamplingParams:
        """This request's sampling parameters within the server's limits; an LMError names
        the request field at fault."""
        max_tokens = self.max_tokens
        if "max_tokens" not in self.model_fields_set:  # the default must fit a lower limit
            max_tokens = min(max_tokens, settings.max_tokens_limit)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(max_new_tokens=max_tokens, temperature=self.temperature,
                                top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                                seed=self.seed,
                                stop=stop, logprobs=self.logprobs)
        try:
            params.validate(settings.sampling_limits())
        except LMError as exc:
            raise LMError(str(exc), param=_REQUEST_FIELD.get(exc.param, exc.param)) from None
        return params


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lm"
    kind: str
    tokenizer: str
    num_params: int | None = None
    context_size: int | None = None
    parent: str | None = None  # a LoRA adapter's base model (as vLLM's model cards)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "draining"]
    models: list[str]
    running: int
    waiting: int


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="model name; defaults to the first one served")
    input: str | list[str] = Field(..., description="text, or a list of texts")
    encoding_format: Literal["float", "base64"] = "float"


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
