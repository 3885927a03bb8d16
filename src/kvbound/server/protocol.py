"""The wire format: OpenAI-compatible request models (pydantic, strict types), the error and usage JSON (a
generation's response objects and stream chunks are server/replies.py's). Knows nothing of sessions or the model;
turns a request into plain Python values.

Beyond OpenAI's fields a chat request may carry `session_id` (keep the conversation's KV cache between requests)
and vLLM-style `top_k`, `min_p`, `repetition_penalty`; responses carry a `kvbound` object (session, reuse, KV).
`response_format` (text, json_object, json_schema) becomes kvbound's `json_schema` sampling option, `logprobs` /
`top_logprobs` its `logprobs` option; `tools` are server/tools.py's. Fields this server cannot honour (n > 1,
functions, echo, ...) are refused by name, never ignored."""

from __future__ import annotations

import math
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator, model_validator

from kvbound.engine.constraint import ANY_JSON_OBJECT
from kvbound.engine.logprobs import MAX_TOP_LOGPROBS

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
SessionId = Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN)]
MAX_STOP = 4  # as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # as OpenAI's /v1/completions


def stop_strings(stop: str | list[str] | None, limit: int) -> list[str] | None:
    """A request's `stop` as a list (None when empty); ValueError unless it is up to `limit` non-empty strings."""
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (len(stops) > limit or not all(stops)):
        raise ValueError(f"stop must be up to {limit} non-empty strings")
    return stops or None


class _Strict(BaseModel):
    # strict: "5" is not an int and 1 is not a bool (as OpenAI answers); unknown fields are ignored (clients send
    # many we do not use), while the ones we cannot honour are refused by name below.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # as OpenAI


class CalledFunction(_Strict):
    name: FunctionName
    arguments: str  # JSON text, as the reply gave it


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = Field(None, validate_default=True)  # a tool message: the call it answers

    @field_validator("tool_calls")
    @classmethod
    def _calls(cls, calls: list[ToolCall] | None, info: ValidationInfo) -> list[ToolCall] | None:
        if calls and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        return calls

    @field_validator("tool_call_id")
    @classmethod
    def _answers(cls, call_id: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not call_id:
            raise ValueError("a tool message needs tool_call_id: the id of the call it answers")
        return call_id

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; none: the function takes no arguments
    strict: bool | None = None  # the schema is always enforced, strict or not


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(_Strict):
    name: FunctionName


class ToolChoice(_Strict):
    type: Literal["function"]
    function: ChosenFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # none: any JSON value
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object: {\"name\": ..., \"schema\": {...}}")
        return self

    def reply_schema(self) -> dict[str, Any] | None:
        """The JSON schema a reply must satisfy (kvbound's `json_schema` option), or None for plain text."""
        if self.type == "json_object":
            return dict(ANY_JSON_OBJECT)
        if self.type == "json_schema":
            return self.json_schema.schema_ if self.json_schema.schema_ is not None else {}
        return None


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None  # OpenAI's end-user id: checked, not used
    # vLLM-style extensions (the openai client sends them through `extra_body`)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, lt=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str] | None:
        return stop_strings(stop, MAX_STOP)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids (digits), got {key!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value}")
        return bias

    # field → the only values this server can honour; a request with another value is refused by the field's name
    HONOURED: ClassVar[dict[str, tuple]] = {"n": (1,), "presence_penalty": (None, 0.0),
                                            "frequency_penalty": (None, 0.0)}

    def unsupported(self) -> str | None:
        """The name of a field set to something this server cannot do (a 400), or None."""
        return next((name for name, values in self.HONOURED.items() if getattr(self, name) not in values), None)

    def sampling(self, max_tokens: int) -> dict[str, Any]:
        """Keyword options of `Chat.stream` / `LLM.stream_raw` (kvbound's SamplingParams)."""
        given = {"max_new_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                 "seed": self.seed, "stop": self.stop, "top_k": self.top_k, "min_p": self.min_p,
                 "repetition_penalty": self.repetition_penalty}
        if self.logit_bias:  # OpenAI: -100 bans a token
            given["logit_bias"] = {int(k): (-math.inf if v <= -100 else v) for k, v in self.logit_bias.items()}
        if self.response_format is not None:
            given["json_schema"] = self.response_format.reply_schema()
        given["logprobs"] = self.logprob_count()
        return {k: v for k, v in given.items() if v is not None}

    def logprob_count(self) -> int | None:
        """kvbound's `logprobs` option: the alternatives to report per token, or None for no logprobs."""
        return None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    session_id: SessionId | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None  # the deprecated forms of tools and tool_choice: refused, use those
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    HONOURED: ClassVar[dict[str, tuple]] = {**_Sampling.HONOURED, "functions": (None, []),
                                            "function_call": (None, "none")}

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    HONOURED: ClassVar[dict[str, tuple]] = {**_Sampling.HONOURED, "echo": (False,), "suffix": (None, ""),
                                            "best_of": (None, 1)}

    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("give one prompt (a string or a list of one string)")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt


class SessionCreate(_Strict):
    session_id: SessionId | None = None
    system: str | None = None


# -- responses ------------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finish_reason(kvbound_reason: str) -> str:
    """kvbound's 'context_full' (the cache could take no more tokens) is OpenAI's 'length'."""
    return "stop" if kvbound_reason == "stop" else "length"
