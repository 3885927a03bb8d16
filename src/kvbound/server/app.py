"""The HTTP app: `create_app(llm, settings)` wires one shared KV pool, the session registry, the engine worker and
the metrics, and defines the routes — OpenAI's /v1/chat/completions, /v1/completions and /v1/models; kvbound's
/v1/sessions, /v1/memory, /metrics, /health and /dashboard (server.dashboard); Ollama's /api/ (server.ollama).
Routes validate and translate; all model work runs on the worker."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.routing import Match
from starlette.types import Scope

from kvbound.engine.constraint import check_schema
from kvbound.engine.sampler import sampling_params
from kvbound.server import errors
from kvbound.server.admission import PoolAdmission
from kvbound.server.dashboard import mount_dashboard
from kvbound.server.errors import ApiError, api_error
from kvbound.server.handling import check_conversation, client_of, collect, first_event
from kvbound.server.metrics import CONTENT_TYPE, Metrics
from kvbound.server.middleware import ApiKey, BodyLimit, CatchAll, RequestCounter
from kvbound.server.logprobs import LogprobFormat
from kvbound.server.ollama import OllamaErrors, mount_ollama
from kvbound.server.protocol import ChatRequest, CompletionRequest, SessionCreate, error_body, new_id
from kvbound.server.replies import ChatReply, CompletionReply
from kvbound.server.scheduler import Event, Stream, Worker
from kvbound.server.sessions import SessionRegistry, SessionStore
from kvbound.server.settings import ServerSettings
from kvbound.server.state import Server
from kvbound.server.tools import ToolUse, conversation as tool_conversation
from kvbound.server.turns import ChatTurn, RawCompletion, TurnResult

if TYPE_CHECKING:
    from kvbound.llm import LLM

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default for /v1/completions


def default_model_id(llm: "LLM") -> str:
    path = Path(str(llm.checkpoint.path))
    return (path.stem if path.suffix == ".gguf" else path.name) or llm.config.name or "kvbound"


def create_app(llm: "LLM", settings: ServerSettings | None = None, store: SessionStore | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    pool = llm.shared_pool(settings.pool_budget(llm), settings.kv_dtype)
    registry = SessionRegistry(llm, pool, settings, store)
    server = Server(llm, settings, registry, PoolAdmission(pool, registry),
                    Worker(settings.max_active, settings.max_queued, queue_timeout_s=settings.queue_timeout_s),
                    Metrics(),
                    settings.model_id or default_model_id(llm))
    llm.on_memory_event(server.metrics.on_memory_event)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.worker.start()
        try:
            yield
        finally:
            server.worker.stop()

    app = FastAPI(title="kvbound", summary="OpenAI-compatible chat with a bounded, shared KV cache",
                  lifespan=lifespan)
    app.state.kvbound = server
    errors.install(app)
    _routes(app, server)
    mount_dashboard(app)
    mount_ollama(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout_s=settings.body_timeout_s)  # runs first
    app.add_middleware(ApiKey, key=settings.api_key, is_public=server.is_public)
    app.add_middleware(CatchAll)
    app.add_middleware(OllamaErrors)  # Ollama's error shape under /api/, for every error above
    app.add_middleware(RequestCounter, count=lambda route, status: server.metrics.requests.labels(
        route, str(status)).inc(), route_of=_route_of(app))
    return app


def _route_of(app: FastAPI) -> Callable[[Scope], str]:
    def route_of(scope: Scope) -> str:
        for route in app.router.routes:
            if route.matches(scope)[0] == Match.FULL:
                return getattr(route, "path", "other")
        return "other"  # unknown paths share one label, so the label set stays small

    return route_of


# -- request checks -------------------------------------------------------------------------------------------------
def _check_request(server: Server, body: ChatRequest | CompletionRequest, max_tokens: int | None,
                   default_tokens: int, max_tokens_field: str = "max_tokens") -> dict[str, Any]:
    """Model, unsupported fields and max_tokens checked; the request's kvbound sampling options."""
    accepted = {server.model_id, "default", server.llm.config.name}
    if body.model is None:  # OpenAI's API requires it; answering anyway would hide a client's mistake
        raise ApiError(400, f"model is required; this server serves '{server.model_id}' (or say 'default')",
                       param="model", code="missing_required_parameter")
    if body.model not in accepted:
        raise ApiError(404, f"the model '{body.model}' does not exist; this server serves '{server.model_id}'",
                       param="model", code="model_not_found")
    unsupported = body.unsupported()
    if unsupported is not None:
        replaced_by = {"functions": "tools", "function_call": "tool_choice"}.get(unsupported)
        message = ("n must be 1: this server returns one choice per request" if unsupported == "n" else
                   f"{unsupported} is the deprecated form of {replaced_by}; send {replaced_by} instead" if replaced_by
                   else f"{unsupported} is not supported by this server; leave it out")
        raise ApiError(400, message, param=unsupported, code="unsupported_parameter")
    context = server.llm.config.max_context
    if max_tokens is not None and max_tokens > context:
        raise ApiError(400, f"{max_tokens_field} is {max_tokens:,} but the model's context holds {context:,} tokens; "
                       f"ask for at most {context:,}", param=max_tokens_field)
    sampling = body.sampling(max_tokens or min(default_tokens, context))
    vocab = server.llm.config.vocab_size
    outside = sorted(int(k) for k in body.logit_bias or {} if int(k) >= vocab)
    if outside:
        raise ApiError(400, f"logit_bias names token {outside[0]}, outside the model's vocabulary of {vocab:,} "
                       f"tokens (ids 0 to {vocab - 1:,})", param="logit_bias", code="invalid_logit_bias")
    if "json_schema" in sampling:
        try:
            check_schema(sampling["json_schema"])
        except ValueError as e:
            raise ApiError(400, f"response_format: {e}", param="response_format.json_schema.schema",
                           code="invalid_json_schema") from None
    sampling_params(vocab, **sampling)  # kvbound's own checks (ValueError → 400)
    return sampling


def _sse(data: dict[str, Any] | str) -> dict[str, str]:
    return {"data": data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}


async def _stream_events(stream: Stream, event: Event, reply: ChatReply,
                         include_usage: bool) -> AsyncIterator[dict[str, str]]:
    """SSE events of a generation: its chunks (opening, those of each piece, closing, usage if asked), then [DONE].
    A failure after the first piece can only be told in the stream: an OpenAI error object, then the end."""
    try:
        for chunk in reply.opening():
            yield _sse(chunk)
        while event.kind == "piece":
            for chunk in reply.piece(event.value, event.logprobs):
                yield _sse(chunk)
            event = await stream.next()
        if event.kind == "error":
            error = api_error(event.value)
            yield _sse(error_body(error.message, error.type, error.param, error.code))
            return
        result: TurnResult = event.value
        for chunk in reply.closing(result.finish_reason, result.kvbound):
            yield _sse(chunk)
        if include_usage:
            yield _sse(reply.usage(result.usage))
        yield _sse("[DONE]")
    finally:
        stream.cancel()  # the client went away mid-stream: stop generating (a no-op once it ended)


# -- routes -----------------------------------------------------------------------------------------------------------
def _routes(app: FastAPI, server: Server) -> None:
    llm, settings, registry, worker = server.llm, server.settings, server.registry, server.worker

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model_id, "active": worker.active, "queued": worker.queued}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict[str, Any]:
        if model not in (server.model_id, "default"):
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{server.model_id}'",
                           param="model", code="model_not_found")
        return _model_card(server)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        sampling = _check_request(server, body, body.requested_tokens, settings.default_max_tokens,
                                  "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
        check_conversation(body.messages, settings.max_messages)
        tools = ToolUse.of(body)
        if tools is not None and tools.calls_possible:  # the reply follows the tool grammar (response_format: its text)
            sampling["grammar"] = tools.grammar(sampling.pop("json_schema", None))
        task = ChatTurn(registry, server.admission, tool_conversation(body.messages, tools), body.session_id, sampling,
                        server.metrics.observe_reply, owner=client_of(request))
        stream, first = await first_event(server, task, request)
        headers = task.info.headers()
        reply = ChatReply(new_id("chatcmpl"), server.model_id, _logprob_format(server, body), tools)
        if body.stream:
            return EventSourceResponse(_stream_events(stream, first, reply, _include_usage(body)), headers=headers,
                                       sep="\n")
        return JSONResponse(reply.whole(await collect(stream, first, request)), headers=headers)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        sampling = _check_request(server, body, body.max_tokens, COMPLETION_DEFAULT_TOKENS)
        task = RawCompletion(llm, body.prompt, sampling, server.admission, registry.capacity, settings.kv_dtype,
                             server.metrics.observe_reply)
        stream, first = await first_event(server, task, request)
        reply = CompletionReply(new_id("cmpl"), server.model_id, _logprob_format(server, body))
        if body.stream:
            return EventSourceResponse(_stream_events(stream, first, reply, _include_usage(body)), sep="\n")
        return JSONResponse(reply.whole(await collect(stream, first, request)))

    @app.get("/v1/sessions")
    async def list_sessions() -> dict[str, Any]:
        def listing() -> list[dict[str, Any]]:
            stored = [{"id": i, "object": "session", "state": "stored"} for i in registry.stored_ids()]
            return [registry.summary(s) for s in registry.sessions()] + stored

        return {"object": "list", "data": await worker.call(listing)}

    @app.post("/v1/sessions", status_code=201)
    async def create_session(request: Request, body: SessionCreate | None = None) -> dict[str, Any]:
        body = body or SessionCreate()
        owner = client_of(request)
        return await worker.call(lambda: registry.detail(registry.create(body.session_id, body.system or None,
                                                                         owner=owner)))

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str) -> dict[str, Any]:
        return await worker.call(lambda: registry.detail(registry.get(session_id)))

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str) -> dict[str, Any]:
        await worker.call(lambda: registry.delete(session_id))
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @app.get("/v1/memory")
    async def memory() -> dict[str, Any]:
        return await worker.call(server.memory)

    @app.get("/metrics")
    async def metrics() -> Response:
        document = await worker.call(server.memory)
        return Response(server.metrics.render(document), media_type=CONTENT_TYPE)


def _logprob_format(server: Server, body: ChatRequest | CompletionRequest) -> LogprobFormat | None:
    return LogprobFormat(server.llm.tokenizer) if body.logprob_count() is not None else None


def _include_usage(body: ChatRequest | CompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _model_card(server: Server) -> dict[str, Any]:
    config = server.llm.config
    return {"id": server.model_id, "object": "model", "created": 0, "owned_by": "kvbound",
            "context_length": config.max_context, "session_capacity_tokens": server.registry.capacity}
