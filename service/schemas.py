"""Request and response shapes of the OpenAI-compatible API (they are also the OpenAPI schema).

Types are strict, as JSON has them (`"stream": "yes"` is a 400 naming `stream`); `null`
means the field's default. Fields that only describe the caller (`user`, `metadata`, ...)
are accepted and ignored; a field that would change the output but is not implemented
(`best_of` above 1, `suffix`, `tools`, ...) is a 400 naming it, never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lm.errors import LMError
from lm.sampling import MAX_TOP_LOGPROBS, SamplingParams
from service.settings import Settings

StrictInt = Annotated[int, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]

# Request fields named differently from the sampling parameter they set.
_REQUEST_FIELD = {"max_new_tokens": "max_tokens", "prompt_logprobs": "logprobs"}


class FewShotExample(BaseModel):
    input: str = Field(min_length=1)
    output: str = Field(min_length=1)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return _drop_nulls(data)


def _drop_nulls(data: Any) -> Any:
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def _unimplemented(data: Any, refused: dict) -> None:
    """400 naming the first field whose value asks for something lm does not do."""
    if not isinstance(data, dict):
        return
    for name, allowed in refused.items():
        if name in data and data[name] is not None and not allowed(data[name]):
            raise LMError(f"{data[name]!r} is not supported by this server", param=name)


class SamplingRequest(BaseModel):
    """The sampling fields that completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="model name; defaults to the first one served")
    max_tokens: StrictInt = Field(16, ge=0, description="new tokens to generate at most")
    temperature: StrictFloat = Field(1.0, ge=0.0, le=100.0, description="0 is greedy")
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0, description="0 turns it off (extension)")
    min_p: StrictFloat = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description=(
            "drop tokens less likely than min_p times the most likely one; 0 turns it off "
            "(vLLM's extension)"
        ),
    )
    presence_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: StrictFloat = Field(
        1.0,
        gt=0.0,
        le=10.0,
        description=(
            "divides the logits of tokens already in the prompt or the output; 1 turns it off "
            "(vLLM's extension)"
        ),
    )
    logit_bias: dict[str, StrictFloat] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100] added to its logit"
    )
    n: StrictInt = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return _drop_nulls(data)

    def sampling_params(
        self,
        settings: Settings,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """This request's sampling parameters within the server's limits (`max_tokens`
        None: the default, cut to the server's limit); an LMError names the field at fault."""
        if max_tokens is None:
            max_tokens = min(self.max_tokens, settings.max_tokens_limit)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise LMError(f"keys must be token ids, got {key!r}", param="logit_bias") from None
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=bias,
            seed=self.seed,
            stop=stop,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        try:
            params.validate(settings.sampling_limits())
        except LMError as exc:
            raise LMError(str(exc), param=_REQUEST_FIELD.get(exc.param, exc.param)) from None
        return params


TokenIds = list[StrictInt]


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        ..., description="text, a list of texts, token ids, or a list of token id lists"
    )
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = Field(
        False,
        description=("prefix the prompt; with logprobs, also the prompt tokens' log-probabilities"),
    )
    examples: list[FewShotExample] | None = Field(
        None, description="few-shot (input, output) pairs; `prompt` is then the query (extension)"
    )
    template: str | None = Field(
        None, description="few-shot template with {input} and {output} (extension)"
    )
    best_of: StrictInt | None = Field(None, ge=1, le=1, description="only 1 (the default)")
    suffix: str | None = Field(None, max_length=0, description="not supported: only empty")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unimplemented(cls, data: Any) -> Any:
        _unimplemented(data, {"best_of": lambda v: v == 1, "suffix": lambda v: v == ""})
        return data

    def to_sampling_params(self, settings: Settings) -> SamplingParams:
        """This request's sampling parameters within the server's limits."""
        scoring = self.echo and self.logprobs is not None
        max_tokens = self.max_tokens if "max_tokens" in self.model_fields_set else None
        return self.sampling_params(
            settings, max_tokens, self.logprobs, self.logprobs if scoring else None
        )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(
        None, ge=1, description="OpenAI's newer name for max_tokens (wins when both are given)"
    )
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: StrictBool = Field(
        True, description="end the prompt with the assistant's turn opening (vLLM's extension)"
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_unimplemented(cls, data: Any) -> Any:
        _unimplemented(
            data,
            {
                "tools": lambda v: v == [],
                "functions": lambda v: v == [],
                "tool_choice": lambda v: v == "none",
                "function_call": lambda v: v == "none",
                "response_format": lambda v: isinstance(v, dict) and v.get("type") == "text",
                "audio": lambda v: False,
                "prediction": lambda v: False,
                "best_of": lambda v: v == 1,
            },
        )
        return data

    def to_sampling_params(self, settings: Settings) -> SamplingParams:
        """This request's sampling parameters within the server's limits."""
        if self.top_logprobs and not self.logprobs:
            raise LMError("needs logprobs true", param="top_logprobs")
        max_tokens = self.max_completion_tokens
        if max_tokens is None and "max_tokens" in self.model_fields_set:
            max_tokens = self.max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise LMError("must be at least 1", param="max_tokens")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(settings, max_tokens, logprobs)

    def message_dicts(self) -> list[dict]:
        return [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in self.messages
        ]


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


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatRender(BaseModel):
    model: str
    prompt: str = Field(description="the messages as the model reads them")
    stop: list[str] = Field(description="stop sequences the template adds")


class TokenizeRequest(BaseModel):
    """vLLM's: a text `prompt`, or chat `messages` rendered by the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = Field(True, description="accepted; lm adds none")
    return_token_strs: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return _drop_nulls(data)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What lm-evaluation-harness's remote tokenizer reads (vLLM's /tokenizer_info)."""

    tokenizer_class: str
    vocab_size: int
    model_max_length: int | None
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None


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
