"""A generation's result as OpenAI's response objects: the whole reply (chat.completion, text_completion) or its
stream chunks (the opening, one or more per text piece, the closing, the usage), with the pieces' logprobs
(server/logprobs.py) and, under a tool grammar, the reply read as tool calls (server/tools.py) when asked for.
Builds JSON only; the routes send it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvbound.server import tools as tool_calls

if TYPE_CHECKING:
    from kvbound.engine.logprobs import TokenLogprob
    from kvbound.server.logprobs import LogprobFormat
    from kvbound.server.tools import ToolUse
    from kvbound.server.turns import TurnResult


def chat_chunk(id: str, model: str, delta: dict, finish_reason: str | None = None,
               logprobs: dict | None = None, **fields: Any) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
            **fields}


def completion_response(id: str, model: str, text: str, finish_reason: str | None,
                        usage: dict | None = None, logprobs: dict | None = None) -> dict[str, Any]:
    body = {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if usage is not None:
        body["usage"] = usage
    return body


class ChatReply:
    """One chat completion's response objects. `logprobs`: how to write the tokens' logprobs (None: not asked
    for); `tools`: a tool use whose grammar the reply follows (None, or choice "none": the reply is text)."""

    def __init__(self, id: str, model: str, logprobs: "LogprobFormat | None" = None,
                 tools: "ToolUse | None" = None):
        self.id, self.model, self.logprobs = id, model, logprobs
        self.tools = tools if tools is not None and tools.calls_possible else None
        self.calls = tool_calls.CallStream() if self.tools is not None else None

    def _logprobs(self, entries: Sequence["TokenLogprob"]) -> dict[str, Any] | None:
        return self.logprobs.chat(entries) if self.logprobs is not None else None

    def _finish(self, finish: str, called: bool) -> str:
        return "tool_calls" if called and finish == "stop" else finish

    def whole(self, result: "TurnResult") -> dict[str, Any]:
        if self.tools is not None:
            said = tool_calls.message(result.text, self.tools)
        else:
            said = {"content": result.text}
        message = {"role": "assistant", "content": None, "refusal": None, "annotations": [], **said}
        return {"id": self.id, "object": "chat.completion", "created": int(time.time()), "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": self._logprobs(result.logprobs or []),
                             "finish_reason": self._finish(result.finish_reason, "tool_calls" in said)}],
                "usage": result.usage, "kvbound": result.kvbound}

    def opening(self) -> list[dict[str, Any]]:
        return [chat_chunk(self.id, self.model, {"role": "assistant", "content": ""})]

    def piece(self, text: str, logprobs: Sequence["TokenLogprob"] = ()) -> list[dict[str, Any]]:
        """The chunks of one piece of text: its delta (content, or tool-call deltas; none while a tool call may
        still be starting), the first carrying the piece's logprobs."""
        deltas = self.calls.feed(text) if self.calls is not None else [{"content": text}] if text else []
        written = self._logprobs(logprobs) if logprobs else None
        if not deltas and written is None:
            return []
        return [chat_chunk(self.id, self.model, delta, logprobs=written if i == 0 else None)
                for i, delta in enumerate(deltas or [{}])]

    def closing(self, finish: str, extra: dict[str, Any]) -> list[dict[str, Any]]:
        rest = self.calls.finish() if self.calls is not None else []
        called = self.calls is not None and self.calls.called
        return [*(chat_chunk(self.id, self.model, delta) for delta in rest),
                chat_chunk(self.id, self.model, {}, self._finish(finish, called), kvbound=extra)]

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**chat_chunk(self.id, self.model, {}), "choices": [], "usage": usage}


class CompletionReply(ChatReply):
    """One text completion's response objects: a text piece per chunk, its logprobs counting text offsets from the
    completion's start."""

    def __init__(self, id: str, model: str, logprobs: "LogprobFormat | None" = None):
        super().__init__(id, model, logprobs)
        self.sent = 0  # characters streamed so far: where the next piece's text offsets start

    def whole(self, result: "TurnResult") -> dict[str, Any]:
        written = self.logprobs.completion(result.logprobs or []) if self.logprobs is not None else None
        return {**completion_response(self.id, self.model, result.text, result.finish_reason, result.usage, written),
                "kvbound": result.kvbound}

    def opening(self) -> list[dict[str, Any]]:
        return []

    def piece(self, text: str, logprobs: Sequence["TokenLogprob"] = ()) -> list[dict[str, Any]]:
        written = self.logprobs.completion(logprobs, self.sent) if self.logprobs is not None else None
        self.sent += len(text)
        return [completion_response(self.id, self.model, text, None, logprobs=written)]

    def closing(self, finish: str, extra: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**completion_response(self.id, self.model, "", finish), "kvbound": extra}]

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**completion_response(self.id, self.model, "", None), "choices": [], "usage": usage}
