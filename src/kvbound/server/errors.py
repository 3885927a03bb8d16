"""Every failure as an HTTP status with OpenAI's error JSON: the server's own error types, the map from kvbound's
errors to statuses, and the FastAPI exception handlers (validation → 400, not FastAPI's 422). Anything unexpected
becomes a 500 without a traceback (which goes to the log instead) in middleware.CatchAll."""

from __future__ import annotations

import math

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvbound.errors import (ContextOverflowError, KvboundError, MemoryBudgetExceeded, ModelFormatError,
                            ModelNotFoundError, UnsupportedModelError)
from kvbound.server.protocol import error_body

logger = logging.getLogger("kvbound.server")


class ApiError(Exception):
    """A request the server answers with `status` and OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


class ServerBusy(KvboundError):
    """The shared KV pool (or the generation queue, or a session) is taken by requests in progress; a retry
    later can succeed. `needed` / `available` are in the unit the message names (blocks, requests);
    `retry_after_s` is the Retry-After the response carries."""

    def __init__(self, message: str, *, needed: int = 0, available: int = 0, retry_after_s: float = 1.0):
        super().__init__(message)
        self.needed, self.available, self.retry_after_s = needed, available, retry_after_s


class PoolBusy(ServerBusy):
    """The shared KV pool's free blocks are reserved by turns in progress (or by an earlier waiting turn): the
    engine worker keeps such a request queued until room frees or its wait passes the queue timeout."""


class SessionNotFound(KvboundError):
    """No session with this id (in memory or in the store)."""


def api_error(error: BaseException) -> ApiError:
    """The status and JSON for any exception a route or the engine raised."""
    if isinstance(error, ApiError):
        return error
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ServerBusy):
        return ApiError(429, message, code="server_busy", type="server_busy",
                        headers={"Retry-After": str(max(1, math.ceil(error.retry_after_s)))})
    if isinstance(error, SessionNotFound):
        return ApiError(404, message, param="session_id", code="session_not_found")
    if isinstance(error, ContextOverflowError):  # KVBudgetExceeded included: the turn cannot fit the budget
        return ApiError(413, message, code="context_length_exceeded")
    if isinstance(error, MemoryBudgetExceeded):
        return ApiError(413, message, code="memory_budget_exceeded")
    if isinstance(error, (ModelNotFoundError, ModelFormatError, UnsupportedModelError)):
        logger.error("model error while serving: %s", message)
        return ApiError(500, message, type="server_error", code="model_error")
    if isinstance(error, (KvboundError, ValueError, TypeError)):  # bad sampling values, a template's refusal
        return ApiError(400, message)
    logger.error("unexpected error while serving", exc_info=error)
    return ApiError(500, "internal server error; the server log has the details", type="server_error",
                    code="internal_error")


def error_response(error: BaseException) -> JSONResponse:
    e = api_error(error)
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line for pydantic's errors (the first three fields), and the first field's name."""
    parts: dict[str, str] = {}
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body" and not _union_member(p)]
        where = ".".join(loc)
        if where in parts:  # the other members of a union: the first one's message says enough
            continue
        kind = error.get("type")
        if kind == "json_invalid":
            message = f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})"
        elif not loc and kind == "missing":
            message = "the body is empty; send a JSON object"
        elif not loc:
            message = "the body must be a JSON object"
        else:
            message = f"{where}: " + str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        parts[where] = message
    fields = list(parts)
    more = f" (and {len(fields) - 3} more)" if len(fields) > 3 else ""
    return "; ".join(list(parts.values())[:3]) + more, next((f for f in fields if f), None)


def _union_member(part: Any) -> bool:
    """pydantic names the member of a union it tried in the location ('str', 'list[TextPart]'): not a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list"))


def install(app: FastAPI) -> None:
    """Register the handlers that give every error route the OpenAI shape."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(error.errors()))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} is not "
                   f"allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
        return JSONResponse(error_body(message, code=str(error.status_code)), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(ApiError)
    @app.exception_handler(KvboundError)
    @app.exception_handler(ValueError)
    async def _known(request: Request, error: Exception) -> JSONResponse:
        return error_response(error)
    # Anything else is answered by middleware.CatchAll (a handler for Exception would answer and then re-raise it,
    # which can reset the client's connection before it reads the answer).
