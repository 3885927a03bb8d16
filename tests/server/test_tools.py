"""tools / tool_choice (server/tools.py): the prompt a request's tools and tool messages render to, the grammar a reply
follows (which texts it accepts), reading calls out of a reply whole or as it streams; and through the openai client
against a real uvicorn — tool_calls messages whose arguments validate against the function's schema, streamed and
not (the default model over several prompts), a follow-up turn with the tool's result answered in the same session."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llguidance", reason="tool calling needs llguidance: pip install -e '.[serve]'")
jsonschema = pytest.importorskip("jsonschema")

from kvbound.engine.constraint import GrammarConstraint  # noqa: E402
from kvbound.server.errors import ApiError  # noqa: E402
from kvbound.server.protocol import ChatRequest  # noqa: E402
from kvbound.server.tools import CallStream, ToolUse, conversation, read_calls  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["timezone"],
                   "properties": {"timezone": {"type": "string", "maxLength": 30}}}}}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


def request(**fields) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                       "tools": [WEATHER, CLOCK], **fields})


def accepts(use: ToolUse, tokenizer, text: str) -> bool:
    """Whether a reply of exactly `text` (then the end token) is one the tool grammar allows."""
    constraint = GrammarConstraint(use.grammar(), tokenizer)
    try:
        for token in tokenizer.encode(text):
            constraint.advance(token)
    except ValueError:
        return False
    allowed = constraint.mask(torch.zeros(tokenizer.vocab_size)).isfinite()
    return constraint.complete or bool(allowed[sorted(tokenizer.stop_ids)].any())


# -- the grammar, the prompt, the reading -----------------------------------------------------------------------------
def test_the_grammar_allows_what_the_choice_allows(tiny_llm) -> None:
    tokenizer = tiny_llm.tokenizer
    clock = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
    bad_unit = PARIS.replace("celsius", "kelvin")
    extra_key = PARIS.replace('"unit": "celsius"', '"unit": "celsius", "x": 1')
    spaced = PARIS.replace('{"name": ', '{ "name": ')
    cases = [  # (choice, accepted, refused)
        ("required", [PARIS, clock, PARIS + "\n" + clock], ["It is sunny.", bad_unit, extra_key, spaced, ""]),
        ("auto", ["It is sunny.", "", PARIS, "<tool_caller>", " " + PARIS],
         [bad_unit, "<tool_call>\nIt is sunny.", "<tool_call>"]),
        ({"type": "function", "function": {"name": "get_time"}}, [clock], [PARIS, "It is sunny."]),
    ]
    for choice, accepted, refused in cases:
        use = ToolUse.of(request(tool_choice=choice, parallel_tool_calls=True))
        assert [t for t in accepted if not accepts(use, tokenizer, t)] == [], choice
        assert [t for t in refused if accepts(use, tokenizer, t)] == [], choice
    for parallel in (False, None):  # left out: one call (a small model allowed more repeats its call)
        single = ToolUse.of(request(tool_choice="required", parallel_tool_calls=parallel))
        assert accepts(single, tokenizer, PARIS) and not accepts(single, tokenizer, PARIS + "\n" + clock)
    assert ToolUse.of(request(tool_choice="none")).calls_possible is False
    assert ToolUse.of(ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                  "tool_choice": "none"})) is None


def test_a_named_function_must_be_offered_and_parameters_must_be_an_object_schema() -> None:
    with pytest.raises(ApiError, match="'nope', which is not in tools"):
        ToolUse.of(request(tool_choice={"type": "function", "function": {"name": "nope"}}))
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
    with pytest.raises(ApiError, match=r"tools\[0\].function.parameters must describe a JSON object"):
        ToolUse.of(request(tools=[bad]))


def test_the_conversation_renders_tools_calls_and_results() -> None:
    body = request(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time",
                                                              "arguments": '{"timezone": "Europe/Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "14:05"}]}])
    rendered = conversation(body.messages, ToolUse.of(body))
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    system = rendered[0]["content"]
    assert system.startswith("Be brief.\n\n# Tools") and json.dumps(WEATHER) in system and "<tool_call>" in system
    assert rendered[2]["content"] == PARIS + '\n<tool_call>\n{"name": "get_time", "arguments": ' \
                                             '{"timezone": "Europe/Paris"}}\n</tool_call>'
    assert rendered[3]["content"] == "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n14:05\n</tool_response>"
    alone = request(messages=[{"role": "user", "content": "hi"}])
    assert conversation(alone.messages, ToolUse.of(alone))[0]["content"].startswith("# Tools")
    stray = request(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "1"}])
    with pytest.raises(ApiError, match="tool result for 'x'"):
        conversation(stray.messages, None)


def test_calls_are_read_whole_and_as_they_stream() -> None:
    second = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
    text = PARIS + "\n" + second
    content, calls = read_calls(text, final=True)
    assert content is None and [(c.name, json.loads(c.arguments), c.whole) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}, True), ("get_time", {"timezone": "UTC"}, True)]
    assert read_calls("<tool_", final=False) == (None, [])  # may still become a call
    assert read_calls("<tool_", final=True) == ("<tool_", [])
    assert read_calls("Sunny.", final=False) == ("Sunny.", [])
    assert read_calls('<tool_call>\n{"name": "get_wea', final=True) == ('<tool_call>\n{"name": "get_wea', [])
    cut = read_calls(PARIS[:60], final=True)[1]  # cut by max_tokens inside the arguments
    assert cut[0].name == "get_weather" and not cut[0].whole and PARIS[:60].endswith(cut[0].arguments)
    for size in (1, 3, 7):  # any split into pieces gives the same calls
        stream = CallStream()
        deltas = [d for k in range(0, len(text), size) for d in stream.feed(text[k:k + size])] + stream.finish()
        assert all("content" not in d for d in deltas)
        assert _assemble(deltas) == [("get_weather", calls[0].arguments), ("get_time", calls[1].arguments)]
        starts = [d["tool_calls"][0] for d in deltas if "id" in d["tool_calls"][0]]
        assert [s["index"] for s in starts] == [0, 1] and all(s["id"].startswith("call_") for s in starts)
    stream = CallStream()
    assert stream.feed("<tool") == [] and stream.feed("box is") == [{"content": "<toolbox is"}]


def _assemble(deltas: list[dict]) -> list[tuple[str, str]]:
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], ["", ""])
            entry[0] += call["function"].get("name") or ""
            entry[1] += call["function"].get("arguments") or ""
    return [tuple(calls[i]) for i in sorted(calls)]


# -- through the server --------------------------------------------------------------------------------------------
def ask(client, messages, stream: bool, **options):
    """(content, [(name, arguments)], finish_reason) of one chat completion, streamed or not."""
    if not stream:
        choice = client.chat.completions.create(model="default", messages=messages, **options).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    chunks = [c for c in client.chat.completions.create(model="default", messages=messages, stream=True, **options)
              if c.choices]
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks]
    content = "".join(d.get("content", "") for d in deltas) or None
    return content, _assemble(deltas), chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_calls_validate_even_from_random_weights(server, stream) -> None:
    client = server.openai()
    for seed, choice in enumerate(["required", {"type": "function", "function": {"name": "get_time"}}] * 2):
        content, calls, finish = ask(client, [{"role": "user", "content": f"weather {seed}"}], stream,
                                     tools=[WEATHER, CLOCK], tool_choice=choice, parallel_tool_calls=False,
                                     max_tokens=200, temperature=1.0, seed=seed)
        assert finish == "tool_calls" and content is None and len(calls) == 1, (content, calls)
        name, arguments = calls[0]
        assert name == "get_time" or choice == "required"
        jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def test_tool_replies_match_the_openai_sdk_models_strictly(server) -> None:
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER],
            "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 200, "seed": 1, "temperature": 1.0}
    with server.http() as http:
        reply = http.post("/v1/chat/completions", json=body).json()
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    ChatCompletion.model_validate(reply, strict=True)
    message = reply["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["type"] == "function"
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    chunks = [json.loads(d) for d in data[:-1]]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk, strict=True)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert _assemble([c["choices"][0]["delta"] for c in chunks]) == [
        (c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]  # same seed, same call


def test_the_follow_up_with_the_tools_result_continues_the_session(server) -> None:
    """The calls rendered back from the client's history are the text the model wrote: the session's KV is reused."""
    client = server.openai()
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    raw = client.chat.completions.with_raw_response.create(
        model="default", messages=messages, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
        max_tokens=200, temperature=1.0,
        seed=2)
    message = raw.parse().choices[0].message
    messages += [message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 3}'} for call in message.tool_calls]
    again = client.chat.completions.with_raw_response.create(model="default", messages=messages, tools=[WEATHER],
                                                            tool_choice="none", max_tokens=6, temperature=0)
    assert again.headers["x-kvbound-session"] == raw.headers["x-kvbound-session"]
    assert again.headers["x-kvbound-session-state"] == "reused"
    reply = again.parse().choices[0]
    assert reply.message.tool_calls is None and reply.finish_reason in ("stop", "length")


# -- the default model -------------------------------------------------------------------------------------------
PROMPTS = ["What's the weather like in Paris?", "Is it cold in Oslo right now? Use fahrenheit.",
           "What time is it in Tokyo?", "I am flying to New York; what is the time there?",
           "Tell me the temperature in Cairo.", "Do I need an umbrella in London today?"]


@pytest.mark.model
def test_tool_calls_over_many_prompts_streamed_and_not(smollm2_server) -> None:
    client = smollm2_server.openai()
    failures = []
    for k, prompt in enumerate(PROMPTS):
        choice = "required" if k % 3 else {"type": "function", "function": {"name": "get_weather"}}
        content, calls, finish = ask(client, [{"role": "user", "content": prompt}], stream=k % 2 == 1,
                                     tools=[WEATHER, CLOCK], tool_choice=choice, max_tokens=150, temperature=0.7,
                                     seed=k)
        try:
            assert finish == "tool_calls" and content is None and calls
            for name, arguments in calls:
                assert name in PARAMETERS and (name == "get_weather" or k % 3)
                jsonschema.validate(json.loads(arguments), PARAMETERS[name])
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            failures.append(f"{prompt!r}: {finish} {content!r} {calls} ({e})")
    assert not failures, "\n".join(failures)


@pytest.mark.model
def test_the_tools_result_is_answered(smollm2_server) -> None:
    client = smollm2_server.openai()
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What's the weather like in Paris?"}]
    reply = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER],
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=80,
                                           temperature=0)
    call = reply.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments)["city"] == "Paris"
    messages += [reply.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "sunny"}'}]
    answer = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER], max_tokens=60,
                                            temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.content and not choice.message.tool_calls
