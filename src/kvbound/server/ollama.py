"""Ollama's API on the same server, so Ollama clients work unchanged: POST /api/chat and /api/generate (NDJSON, one
object a line, streamed unless `"stream": false`), GET /api/tags, /api/ps and /api/version, POST /api/show, and
errors as `{"error": "..."}`. A request becomes the same ChatTurn or RawCompletion the OpenAI routes submit (one
engine worker and admission queue, sessions found by the history a client resends, the metrics, the API key); this
module owns only the translation: Ollama's request models, its `options` → kvbound's sampling, its reply objects.
Options kvbound cannot honour are refused by name (400), never ignored; `keep_alive` alone is accepted and ignored
(the model stays loaded while the server runs)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp, Message as AsgiMessage, Receive, Scope, Send

from kvbound import __version__
from kvbound.engine.constraint import ANY_JSON_OBJECT, check_schema
from kvbound.engine.logprobs import MAX_TOP_LOGPROBS
from kvbound.engine.sampler import sampling_params
from kvbound.server.errors import ApiError, api_error
from kvbound.server.handling import check_conversation, collect, first_event
from kvbound.server.logprobs import LogprobFormat
from kvbound.server.protocol import CalledFunction, FunctionName, Message, Tool, ToolCall, stop_strings
from kvbound.server.tools import ToolUse, conversation as tool_conversation, read_calls
from kvbound.server.turns import ChatTurn, RawCompletion, TurnResult

if TYPE_CHECKING:
    from kvbound.engine.logprobs import TokenLogprob
    from kvbound.server.scheduler import Event, Stream
    from kvbound.server.state import Server

PREFIX = "/api/"
NDJSON = "application/x-ndjson"
MAX_STOP = 16  # Ollama sets no limit; OpenAI's is 4
# Why a field or option this server cannot honour is refused (the 400's message); others: "leave it out".
WHY_REFUSED = {
    "think": "the model does not think (no reasoning trace); leave think out or send false",
    "suffix": "fill-in-the-middle is not supported; leave suffix out",
    "template": "the model's own chat template is used; render the prompt yourself and send it with raw: true",
    "context": "the token context of an earlier /api/generate is not kept; send the conversation to /api/chat, "
               "which keeps its KV cache between requests",
    "images": "the model reads text only",
    "thinking": "the model does not think; leave thinking out",
    "num_ctx": "a conversation's context is the server's, up to {capacity:,} tokens (--kv-budget, "
               "--session-tokens); ask for at most that or leave num_ctx out",
}


# -- requests -------------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # as server/protocol.py's: "5" is not an int; unknown fields are ignored, the ones we cannot honour refused
    model_config = ConfigDict(strict=True, extra="ignore")


class Options(_Strict):
    """Ollama's `options`: those kvbound's sampling has, and a few it lacks, at the value that turns them off."""

    model_config = ConfigDict(strict=True, extra="allow")  # unknown options are kept, to be refused by name
    num_predict: int | None = None  # -1 / -2: up to the context (Ollama's "infinite" / "fill the context")
    temperature: float | None = Field(None, ge=0.0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    min_p: float | None = Field(None, ge=0.0, lt=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(None, gt=0.0)  # over the whole context (Ollama's: the last repeat_last_n)
    # Many clients send it on every request. Up to a session's capacity it is already met (the server gives each
    # conversation up to that); more cannot be, and is refused.
    num_ctx: int | None = Field(None, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    NO_OP: ClassVar[dict[str, tuple]] = {"presence_penalty": (None, 0.0), "frequency_penalty": (None, 0.0),
                                         "typical_p": (None, 1.0), "tfs_z": (None, 1.0), "mirostat": (None, 0)}

    @field_validator("num_predict")
    @classmethod
    def _predict(cls, n: int | None) -> int | None:
        if n is not None and n < 1 and n not in (-1, -2):
            raise ValueError("num_predict must be >= 1, or -1 / -2 (up to the context)")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str] | None:
        return stop_strings(stop, MAX_STOP)

    def unsupported(self) -> str | None:
        """The first option set to something this server cannot do, or None."""
        unknown = next((name for name, value in (self.model_extra or {}).items() if value is not None), None)
        return unknown or next((n for n, values in self.NO_OP.items() if getattr(self, n) not in values), None)


class _Generation(_Strict):
    model: str | None = None
    format: Literal["", "json"] | dict[str, Any] | None = None  # "json": any JSON object; a dict: a JSON schema
    options: Options | None = None
    stream: bool = True  # Ollama's default
    keep_alive: str | float | None = None  # accepted and ignored: the model stays loaded while the server runs
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    HONOURED: ClassVar[dict[str, tuple]] = {"think": (None, False)}

    def unsupported(self) -> str | None:
        return next((name for name, values in self.HONOURED.items() if getattr(self, name) not in values), None)


class CalledTool(_Strict):
    name: FunctionName
    arguments: dict[str, Any]


class OllamaToolCall(_Strict):
    function: CalledTool


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[OllamaToolCall] | None = None  # an assistant's calls
    tool_name: str | None = None  # a tool message: the function whose result it is


class ChatBody(_Generation):
    messages: list[ChatMessage] = Field(default_factory=list)  # none: Ollama's "load the model" request
    tools: list[Tool] | None = None
    tool_choice: ClassVar[None] = None  # as ToolUse reads a request: calls or text, the model's choice
    parallel_tool_calls: ClassVar[None] = None


class GenerateBody(_Generation):
    prompt: str | None = None  # none or empty: Ollama's "load the model" request
    system: str | None = None
    raw: bool = False  # the prompt as it is, no chat template: a raw completion
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None
    HONOURED: ClassVar[dict[str, tuple]] = {**_Generation.HONOURED, "suffix": (None, ""), "template": (None, ""),
                                            "context": (None, []), "images": (None, [])}


class ShowBody(_Strict):
    model: str | None = None
    name: str | None = None  # what older clients send
    verbose: bool | None = None


# -- checks ---------------------------------------------------------------------------------------------------------
def tagged(name: str) -> str:
    """A model name as Ollama lists it: with a tag (`:latest` unless it has one)."""
    return name if ":" in name else f"{name}:latest"


def _check_model(server: "Server", model: str | None) -> None:
    if not model:
        raise ApiError(400, f"model is required; this server serves '{tagged(server.model_id)}'", param="model")
    name = model.removesuffix(":latest")
    if name not in (server.model_id, "default", server.llm.config.name) and model != tagged(server.model_id):
        raise ApiError(404, f"model '{model}' not found; this server serves '{tagged(server.model_id)}'",
                       param="model")


def _refusal(field: str, name: str, capacity: int = 0) -> ApiError:
    why = WHY_REFUSED.get(name, "leave it out").format(capacity=capacity)
    return ApiError(400, f"{field} is not supported by this server: {why}", param=field)


def _sampling(server: "Server", body: _Generation) -> dict[str, Any]:
    """The model, the unsupported fields and options checked; the request's kvbound sampling options."""
    _check_model(server, body.model)
    options = body.options or Options()
    for name, field in ((body.unsupported(), "{}"), (options.unsupported(), "options.{}")):
        if name is not None:
            raise _refusal(field.format(name), name, server.registry.capacity)
    if options.num_ctx is not None and options.num_ctx > server.registry.capacity:
        raise _refusal("options.num_ctx", "num_ctx", server.registry.capacity)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    context = server.llm.config.max_context
    predict = options.num_predict
    if predict is not None and predict > context:
        raise ApiError(400, f"options.num_predict is {predict:,} but the model's context holds {context:,} tokens; "
                       f"ask for at most {context:,} (or -1: up to the context)", param="options.num_predict")
    max_tokens = context if predict in (-1, -2) else predict or min(server.settings.default_max_tokens, context)
    given = {"max_new_tokens": max_tokens, "temperature": options.temperature, "top_k": options.top_k,
             "top_p": options.top_p, "min_p": options.min_p, "seed": options.seed, "stop": options.stop,
             "repetition_penalty": options.repeat_penalty,
             "logprobs": (body.top_logprobs or 0) if body.logprobs else None}
    if body.format == "json":
        given["json_schema"] = dict(ANY_JSON_OBJECT)
    elif isinstance(body.format, dict):
        try:
            check_schema(body.format)
        except ValueError as e:
            raise ApiError(400, f"format: {e}", param="format") from None
        given["json_schema"] = body.format
    sampling = {k: v for k, v in given.items() if v is not None}
    sampling_params(server.llm.config.vocab_size, **sampling)  # kvbound's own checks (ValueError → 400)
    return sampling


def _messages(body: ChatBody) -> list[Message]:
    """The chat's messages as the OpenAI routes take them. Ollama's calls carry no id: each gets one here, and a tool
    message answers the first call of the assistant message before it not yet answered (of its `tool_name`)."""
    messages: list[Message] = []
    calls: list[ToolCall] = []  # the calls of the assistant message the tool messages in a row answer
    for index, message in enumerate(body.messages):
        where = f"messages[{index}]"
        for field in ("images", "thinking"):
            if getattr(message, field):
                raise _refusal(f"{where}.{field}", field)
        if message.role == "tool":
            call = next((c for c in calls if message.tool_name in (None, c.function.name)), None)
            if call is None:
                wanted = f" of '{message.tool_name}'" if message.tool_name else ""
                raise ApiError(400, f"{where} is a tool result{wanted}, but the assistant message before it made "
                               "no such call still unanswered", param=f"messages.{index}")
            calls.remove(call)
            messages.append(Message(role="tool", content=message.content or "", tool_call_id=call.id))
            continue
        if message.tool_calls and message.role != "assistant":
            raise ApiError(400, f"{where} is a {message.role} message with tool_calls; only an assistant message has "
                           "them", param=f"messages.{index}.tool_calls")
        calls = [ToolCall(id=f"call_{index}_{k}", type="function",
                          function=CalledFunction(name=c.function.name,
                                                  arguments=json.dumps(c.function.arguments, ensure_ascii=False)))
                 for k, c in enumerate(message.tool_calls or [])]
        messages.append(Message(role=message.role, content=message.content or "", tool_calls=calls or None))
    return messages


# -- replies --------------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class OllamaReply:
    """One /api/chat or /api/generate reply as Ollama's objects: its streamed pieces (`message.content` or
    `response`, done false), the final object (done true, done_reason, token counts, durations in nanoseconds and
    kvbound's figures), or the whole reply in one. Under a tool grammar the reply's calls become
    `message.tool_calls` (arguments as objects), each sent once it is whole."""

    def __init__(self, model: str, chat: bool, started_ns: int, tools: ToolUse | None = None,
                 logprobs: LogprobFormat | None = None):
        self.model, self.chat, self.started_ns, self.logprobs = model, chat, started_ns, logprobs
        self.tools = tools if tools is not None and tools.calls_possible else None
        self.text, self.content_sent, self.calls_sent = "", 0, 0  # under tools: the reply so far, what was sent

    def _object(self, text: str, done: bool, calls: list[dict[str, Any]] | None = None,
                logprobs: Sequence["TokenLogprob"] = (), **fields: Any) -> dict[str, Any]:
        said: dict[str, Any] = {"response": text}
        if self.chat:
            said = {"message": {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}}
        written = {"logprobs": self.logprobs.chat(logprobs)["content"]} if self.logprobs is not None else {}
        return {"model": self.model, "created_at": _now(), **said, **written, "done": done, **fields}

    def _unsent(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """Under a tool grammar: the reply's text and whole calls not sent yet."""
        content, calls = read_calls(self.text, final)
        if content is not None:
            text, self.content_sent = content[self.content_sent:], len(content)
            return text, []
        whole = [c for c in calls if c.whole]
        unsent, self.calls_sent = whole[self.calls_sent:], len(whole)
        return "", [{"function": {"name": c.name, "arguments": json.loads(c.arguments)}} for c in unsent]

    def piece(self, text: str, logprobs: Sequence["TokenLogprob"] = ()) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = []
        if self.tools is not None:
            self.text += text
            text, calls = self._unsent(final=False)
        return [self._object(text, False, calls, logprobs)] if text or calls or logprobs else []

    def closing(self, result: TurnResult) -> list[dict[str, Any]]:
        text, calls = self._unsent(final=True) if self.tools is not None else ("", [])
        last = [self._object(text, False, calls)] if text or calls else []  # what a tool grammar held back
        return [*last, self._object("", True, **self._figures(result))]

    def whole(self, result: TurnResult) -> dict[str, Any]:
        text, calls = result.text, []
        if self.tools is not None:
            self.text = result.text
            text, calls = self._unsent(final=True)
        return self._object(text, True, calls, result.logprobs or [], **self._figures(result))

    def _figures(self, result: TurnResult) -> dict[str, Any]:
        usage = result.usage
        return {"done_reason": result.finish_reason, "total_duration": time.perf_counter_ns() - self.started_ns,
                "load_duration": 0, "prompt_eval_count": usage["prompt_tokens"],
                "prompt_eval_duration": _ns(result.prefill_s), "eval_count": usage["completion_tokens"],
                "eval_duration": _ns(result.decode_s), "kvbound": result.kvbound}

    def loaded(self) -> dict[str, Any]:
        """The answer to a request with nothing to answer, which Ollama reads as "load the model"."""
        return self._object("", True, done_reason="load")


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


async def _lines(stream: "Stream", event: "Event", reply: OllamaReply) -> AsyncIterator[str]:
    """The NDJSON lines of a generation. A failure after the first piece can only be told in the stream: Ollama's
    `{"error": "..."}` as the last line."""
    try:
        while event.kind == "piece":
            for obj in reply.piece(event.value, event.logprobs):
                yield _line(obj)
            event = await stream.next()
        if event.kind == "error":
            yield _line({"error": api_error(event.value).message})
            return
        for obj in reply.closing(event.value):
            yield _line(obj)
    finally:
        stream.cancel()  # the client went away mid-stream: stop generating (a no-op once it ended)


# -- errors ---------------------------------------------------------------------------------------------------------
class OllamaErrors:
    """Under /api/, an error response in Ollama's shape, `{"error": "message"}`: the OpenAI-shaped body every other
    part of the server writes (validation, API key, body limit, 404, 500), rewritten."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            return await self.app(scope, receive, send)
        start: AsgiMessage | None = None
        body = b""

        async def rewriting_send(message: AsgiMessage) -> None:
            nonlocal start, body
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until the body is whole
                return
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            body += message.get("body", b"")
            if message.get("more_body", False):
                return
            body = _ollama_error(body)
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewriting_send)


def _ollama_error(body: bytes) -> bytes:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body
    return json.dumps({"error": error["message"]}).encode() if isinstance(error, dict) else body


# -- routes ---------------------------------------------------------------------------------------------------------
def mount_ollama(app: FastAPI) -> None:
    """Add Ollama's routes to an app from `create_app` (its `app.state.kvbound`, a server.state.Server); the app adds
    OllamaErrors to its middleware."""
    server: "Server" = app.state.kvbound
    llm, settings, registry = server.llm, server.settings, server.registry
    server.make_public(["/"])  # Ollama clients' liveness probe, like /health

    async def respond(task: ChatTurn | RawCompletion, request: Request, reply: OllamaReply, stream: bool) -> Response:
        generation, first = await first_event(server, task, request)
        headers = task.info.headers()  # x-kvbound-session(-state), x-kvbound-reused-tokens: how its KV was found
        if stream:
            return StreamingResponse(_lines(generation, first, reply), media_type=NDJSON, headers=headers)
        return JSONResponse(reply.whole(await collect(generation, first, request)), headers=headers)

    def logprob_format(body: _Generation) -> LogprobFormat | None:
        return LogprobFormat(llm.tokenizer) if body.logprobs else None

    @app.get("/", include_in_schema=False)
    async def running() -> PlainTextResponse:
        return PlainTextResponse("kvbound is running (Ollama's API under /api/, OpenAI's under /v1/)")

    @app.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [_card(server)]}

    @app.get("/api/ps")
    async def running_models() -> dict[str, Any]:
        card = _card(server)
        return {"models": [{**card, "size": card["size"] + registry.pool.nbytes, "size_vram": 0,
                            "context_length": registry.capacity}]}

    @app.post("/api/show")
    async def show(body: ShowBody) -> dict[str, Any]:
        _check_model(server, body.model or body.name)
        info, arch = llm.info(), llm.config.arch
        card = _card(server)
        return {"modelfile": "", "parameters": "", "template": "", "details": card["details"],
                "modified_at": card["modified_at"], "capabilities": ["completion", "tools"],
                "model_info": {"general.architecture": arch, "general.basename": info.name,
                               "general.parameter_count": info.parameters, f"{arch}.context_length": info.max_context,
                               f"{arch}.embedding_length": llm.config.hidden_size, f"{arch}.block_count": info.layers,
                               f"{arch}.attention.head_count": info.heads,
                               f"{arch}.attention.head_count_kv": info.kv_heads, f"{arch}.vocab_size": info.vocab_size,
                               "kvbound.session_capacity_tokens": registry.capacity}}

    @app.post("/api/chat")
    async def chat(body: ChatBody, request: Request) -> Response:
        started = time.perf_counter_ns()
        sampling = _sampling(server, body)
        tools = ToolUse.of(body)
        reply = OllamaReply(body.model, True, started, tools, logprob_format(body))
        if not body.messages:
            return JSONResponse(reply.loaded())
        messages = _messages(body)
        check_conversation(messages, settings.max_messages, fewer="drop the oldest turns")
        if tools is not None and tools.calls_possible:  # the reply follows the tool grammar (format: its text)
            sampling["grammar"] = tools.grammar(sampling.pop("json_schema", None))
        task = ChatTurn(registry, server.admission, tool_conversation(messages, tools), None, sampling,
                        server.metrics.observe_reply)
        return await respond(task, request, reply, body.stream)

    @app.post("/api/generate")
    async def generate(body: GenerateBody, request: Request) -> Response:
        started = time.perf_counter_ns()
        sampling = _sampling(server, body)
        reply = OllamaReply(body.model, False, started, logprobs=logprob_format(body))
        if not body.prompt:
            return JSONResponse(reply.loaded())
        if body.raw:
            if body.system:
                raise ApiError(400, "system is not used with raw: true (no template is applied); put it in the prompt",
                               param="system")
            task = RawCompletion(llm, body.prompt, sampling, server.admission, registry.capacity, settings.kv_dtype,
                                 server.metrics.observe_reply)
        else:
            messages = [Message(role="system", content=body.system)] if body.system else []
            messages.append(Message(role="user", content=body.prompt))
            check_conversation(messages, settings.max_messages)
            task = ChatTurn(registry, server.admission, tool_conversation(messages, None), None, sampling,
                            server.metrics.observe_reply)
        return await respond(task, request, reply, body.stream)


def _card(server: "Server") -> dict[str, Any]:
    """The served model as /api/tags lists it (`size`: bytes of its weights in memory; `digest`: of the file's path,
    size and time, not of its contents)."""
    info = server.llm.info()
    path = Path(info.path)
    try:
        stat = path.stat()
        modified, stamp = datetime.fromtimestamp(stat.st_mtime, timezone.utc), f"{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        modified, stamp = datetime.now(timezone.utc), ""
    types = info.file_tensor_types or {}
    name = tagged(server.model_id)
    return {"name": name, "model": name, "modified_at": modified.isoformat().replace("+00:00", "Z"),
            "size": info.weights_bytes, "digest": hashlib.sha256(f"{path}:{stamp}".encode()).hexdigest(),
            "details": {"parent_model": "", "format": info.format, "family": info.arch, "families": [info.arch],
                        "parameter_size": _count(info.parameters),
                        "quantization_level": max(types, key=types.get).upper() if types else info.dtype.upper()}}


def _count(parameters: int) -> str:
    """135M, 1.5B: a parameter count as Ollama writes it."""
    for unit, size in (("B", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
        if parameters >= size:
            return f"{parameters / size:.3g}{unit}"
    return str(parameters)
