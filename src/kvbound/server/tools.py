"""Tool calling for chat requests, in the Hermes / Qwen2.5 format: the tool definitions go into the system prompt, a
call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` and a tool's result comes back as
`<tool_response>\\n...\\n</tool_response>` in a user turn. kvbound renders this text itself (so it works with any
chat template, SmolLM2's included, which knows no tools), constrains the reply with a Lark grammar whose call
arguments follow each function's JSON schema (llguidance: engine/constraint.py), and reads the calls back out of
the reply, whole or as it streams. Owns no model state: it turns request objects into text and text into calls."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvbound.engine.constraint import JSON_OPTIONS, check_grammar, check_schema
from kvbound.server.errors import ApiError

if TYPE_CHECKING:
    from kvbound.server.protocol import ChatRequest, Message, Tool

MAX_TOOLS = 128  # as OpenAI
CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
# What the grammar makes every call start with, up to its arguments (JSON_OPTIONS' separators, no free whitespace).
_CALL_HEAD = re.compile(r'\{"name": "([A-Za-z0-9_-]{1,64})", "arguments": ')
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}

TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{signatures}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ToolUse:
    """A request's tools and what it lets the reply do with them: `choice` is "none" (text only), "auto" (text or
    calls), "required" (calls only) or a function's name (calls of that function only). `parallel`: a reply may
    make several calls, one after another (the model may still make one). Only a request that sets
    parallel_tool_calls to true gets it: left out (OpenAI's default is true) a reply makes one call, because a small
    model allowed more repeats its call until max_tokens cuts it (SmolLM2-135M did on 1 of 6 prompts)."""

    tools: Sequence["Tool"]
    choice: str
    parallel: bool = False

    @classmethod
    def of(cls, request: "ChatRequest") -> "ToolUse | None":
        """The request's tool use, checked (ApiError 400 naming the field), or None when it has no tools."""
        tools, choice = request.tools or [], request.tool_choice
        if len(tools) > MAX_TOOLS:
            raise ApiError(400, f"tools has {len(tools)} functions; at most {MAX_TOOLS} are allowed", param="tools")
        names = [tool.function.name for tool in tools]
        for index, tool in enumerate(tools):
            if names.index(tool.function.name) != index:
                raise ApiError(400, f"tools[{index}].function.name '{tool.function.name}' is given twice; each "
                               "function needs its own name", param=f"tools.{index}.function.name")
            _check_parameters(tool.function.parameters, index)
        if not tools:
            if choice not in (None, "none"):
                raise ApiError(400, "tool_choice needs tools: give the functions in tools, or leave tool_choice out",
                               param="tool_choice")
            return None
        if choice is None or isinstance(choice, str):
            chosen = choice or "auto"
        elif (chosen := choice.function.name) not in names:
            raise ApiError(400, f"tool_choice names the function '{chosen}', which is not in tools "
                           f"({', '.join(names)})", param="tool_choice.function.name", code="unknown_function")
        use = cls(tools, chosen, request.parallel_tool_calls is True)
        if use.calls_possible:
            try:
                check_grammar(use.grammar())
            except ValueError as e:
                raise ApiError(400, f"tools: {e}", param="tools", code="invalid_function_parameters") from None
        return use

    @property
    def calls_possible(self) -> bool:
        return self.choice != "none"

    def system_prompt(self, system: str | None) -> str:
        """The system prompt with the tool definitions after it (as Qwen2.5's template writes them)."""
        signatures = "\n".join(json.dumps(tool.model_dump(exclude_none=True), ensure_ascii=False)
                               for tool in self.tools)
        block = TOOLS_PROMPT.format(signatures=signatures)
        return f"{system}\n\n{block}" if system else block

    def grammar(self, text_schema: dict[str, Any] | None = None) -> str:
        """The Lark grammar (llguidance's dialect) of a reply: calls whose JSON is {"name": one of the allowed
        functions, "arguments": what that function's parameters schema accepts}; with choice "auto", or any text
        that does not start as a call (or, given `text_schema`, a JSON document it accepts: response_format)."""
        allowed = [t for t in self.tools if self.choice in ("auto", "required") or t.function.name == self.choice]
        call = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                           "properties": {"name": {"const": t.function.name},
                                          "arguments": t.function.parameters or NO_PARAMETERS}}
                          for t in allowed], "x-guidance": JSON_OPTIONS}
        calls = 'call ("\\n" call)*' if self.parallel else "call"
        rules = [f"calls: {calls}", f"call: {json.dumps(CALL_OPEN)} call_json {json.dumps(CALL_CLOSE)}",
                 f"call_json: %json {json.dumps(call)}"]
        if self.choice != "auto":
            return "\n".join(["start: calls", *rules])
        if text_schema is not None:
            text = [f"text: %json {json.dumps({**text_schema, 'x-guidance': JSON_OPTIONS})}"]
        else:  # free text, as long as it does not begin as a call: a reply that does is held to the grammar
            text = ["text: TEXT", f"TEXT: /(?s:.*)/ & ~/{re.escape(CALL_OPEN.strip())}(?s:.*)/"]
        return "\n".join(["start: text | calls", *text, *rules])


def _check_parameters(parameters: dict[str, Any] | None, index: int) -> None:
    where = f"tools.{index}.function.parameters"
    if parameters is None:
        return
    if parameters.get("type", "object") != "object":
        raise ApiError(400, f"tools[{index}].function.parameters must describe a JSON object (\"type\": \"object\"), "
                       f"got type {parameters.get('type')!r}", param=where, code="invalid_function_parameters")
    try:
        check_schema(parameters)
    except ValueError as e:
        raise ApiError(400, f"tools[{index}].function.parameters: {e}", param=where,
                       code="invalid_function_parameters") from None


# -- the prompt ---------------------------------------------------------------------------------------------------
def call_text(name: str, arguments: str) -> str:
    """One call as the model writes it (and as an assistant message's tool_calls are rendered back)."""
    return f'{CALL_OPEN}{{"name": {json.dumps(name)}, "arguments": {arguments}}}{CALL_CLOSE}'


def conversation(messages: Sequence["Message"], tools: ToolUse | None) -> list[dict[str, str]]:
    """The messages as kvbound's chats take them — role and text — with tools in this format: the definitions
    after the system prompt ('developer' is the system role), an assistant's calls as call text, the results of
    tool messages in a row as one user turn of <tool_response> blocks. ApiError for a tool message that answers
    no call of the assistant message before it."""
    rendered: list[dict[str, str]] = []
    calls: set[str] = set()  # ids of the calls of the assistant message the tool messages answer
    previous = ""
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if role == "tool":
            if message.tool_call_id not in calls:
                raise ApiError(400, f"messages[{index}] is a tool result for '{message.tool_call_id}', which no "
                               "assistant message before it called (a tool message answers a tool_calls entry of "
                               "the assistant message it follows)", param=f"messages.{index}.tool_call_id")
            block = f"<tool_response>\n{message.text()}\n</tool_response>"
            if previous == "tool":  # results in a row: one turn (as Qwen2.5's template)
                rendered[-1]["content"] += "\n" + block
            else:
                rendered.append({"role": "user", "content": block})
        else:
            content, said = message.text(), [call_text(c.function.name, c.function.arguments)
                                             for c in message.tool_calls or []]
            calls = {call.id for call in message.tool_calls or []}
            rendered.append({"role": role, "content": "\n".join([content, *said] if content else said) or content})
        previous = role
    if tools is not None:
        if rendered and rendered[0]["role"] == "system":
            rendered[0]["content"] = tools.system_prompt(rendered[0]["content"])
        else:
            rendered.insert(0, {"role": "system", "content": tools.system_prompt(None)})
    return rendered


# -- the reply ----------------------------------------------------------------------------------------------------
@dataclass
class ReadCall:
    name: str
    arguments: str  # the JSON text read so far (all of it once the call is whole)
    whole: bool


def read_calls(text: str, final: bool) -> tuple[str | None, list[ReadCall]]:
    """(content, calls) of a reply under a tool grammar, or of its start while it streams (`final` False).
    Content None: the reply is calls (or, not final, may still become some); a call appears once its name is
    whole, its arguments as far as they are written. A reply that is not final and could still start a call is
    undecided: (None, [])."""
    if not text.startswith(CALL_OPEN):
        undecided = not final and CALL_OPEN.startswith(text)
        return (None if undecided else text), []
    calls, at, decoder = [], 0, json.JSONDecoder()
    while text.startswith(CALL_OPEN, at):
        head = _CALL_HEAD.match(text, at + len(CALL_OPEN))
        if head is None:
            break  # the name is still being written (or the reply was cut there)
        try:
            _, end = decoder.raw_decode(text, head.end())
        except ValueError:  # the arguments are still being written
            calls.append(ReadCall(head[1], text[head.end():], False))
            break
        calls.append(ReadCall(head[1], text[head.end():end], True))
        at = end + len("}" + CALL_CLOSE + "\n")
    if final and not calls:  # cut before the first call's name: say what was written
        return text, []
    return None, calls


@dataclass
class CallStream:
    """The OpenAI deltas of a reply under a tool grammar as it streams: content deltas for a text reply, else per
    call one delta with its id and name, then deltas of its arguments text."""

    text: str = ""
    ids: list[str] = field(default_factory=list)  # each call's id, once announced
    sent: list[int] = field(default_factory=list)  # characters of each call's arguments sent
    content_sent: int = 0

    def feed(self, piece: str, final: bool = False) -> list[dict[str, Any]]:
        self.text += piece
        content, calls = read_calls(self.text, final)
        if content is not None:
            delta, self.content_sent = content[self.content_sent:], len(content)
            return [{"content": delta}] if delta else []
        deltas = []
        for index, call in enumerate(calls):
            if index == len(self.ids):
                self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
                self.sent.append(0)
                deltas.append({"tool_calls": [{"index": index, "id": self.ids[index], "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            if len(call.arguments) > self.sent[index]:
                deltas.append({"tool_calls": [{"index": index,
                                               "function": {"arguments": call.arguments[self.sent[index]:]}}]})
                self.sent[index] = len(call.arguments)
        return deltas

    def finish(self) -> list[dict[str, Any]]:
        return self.feed("", final=True)

    @property
    def called(self) -> bool:
        return bool(self.ids)


def message(text: str, tools: ToolUse) -> dict[str, Any]:
    """A whole reply under a tool grammar as OpenAI's message fields: content, or tool_calls (content None)."""
    content, calls = read_calls(text, final=True)
    if content is not None:
        return {"content": content}
    return {"content": None, "tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}
