"""Ollama's API (server/ollama.py) against a real uvicorn: /api/chat and /api/generate streamed as NDJSON (Ollama's
default) and whole, their counts and durations, `options` mapped onto kvbound's sampling (checked against the OpenAI
route given the same values), `format` as structured output, a resent conversation reusing its KV, the model routes,
errors as `{"error": "..."}`, the API key; and the unmodified `ollama` client."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest

jsonschema = pytest.importorskip("jsonschema")

from kvbound.server.ollama import ChatBody, OllamaReply, _messages  # noqa: E402
from kvbound.server.protocol import ChatRequest  # noqa: E402
from kvbound.server.tools import ToolUse, conversation  # noqa: E402

USER = [{"role": "user", "content": "Hello there"}]
FIGURES = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
           "eval_duration")
PET = {"type": "object", "additionalProperties": False, "required": ["name", "pet"],
       "properties": {"name": {"type": "string", "maxLength": 8}, "pet": {"enum": ["cat", "dog"]}}}


def post(server, route: str, **body) -> httpx.Response:
    return httpx.post(server.url + route, json={"model": "tiny", **body}, timeout=60)


def lines(server, route: str, **body) -> tuple[httpx.Response, list[dict]]:
    """A streamed request (no `stream` field: Ollama streams by default): the response and its NDJSON objects."""
    with server.http() as http, http.stream("POST", route, json={"model": "tiny", **body}) as response:
        objects = [json.loads(line) for line in response.iter_lines() if line]
    return response, objects


def check_final(final: dict) -> None:
    assert final["done"] is True and final["done_reason"] in ("stop", "length")
    assert all(isinstance(final[k], int) and final[k] >= 0 for k in FIGURES)
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"] > 0
    assert final["created_at"].endswith("Z")


# -- chat and generate ----------------------------------------------------------------------------------------------
def test_chat_streams_ndjson_by_default_and_whole_when_asked(server) -> None:
    options = {"temperature": 0, "num_predict": 8}
    response, objects = lines(server, "/api/chat", messages=USER, options=options)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
    *pieces, final = objects
    assert pieces and all(p["done"] is False and p["message"]["role"] == "assistant" for p in pieces)
    check_final(final)
    assert final["message"] == {"role": "assistant", "content": ""}
    streamed = "".join(p["message"]["content"] for p in pieces)

    whole = post(server, "/api/chat", messages=USER, options=options, stream=False)
    assert whole.headers["content-type"].startswith("application/json")
    body = whole.json()
    check_final(body)
    assert body["message"]["content"] == streamed and body["model"] == "tiny"
    # The counts are the OpenAI route's for the same greedy request, and each token of the text is one counted.
    openai = post(server, "/v1/chat/completions", messages=USER, max_tokens=8, temperature=0).json()
    assert body["prompt_eval_count"] == openai["usage"]["prompt_tokens"] == final["prompt_eval_count"]
    assert body["eval_count"] == openai["usage"]["completion_tokens"] == final["eval_count"] <= 8
    assert (body["done_reason"] == "length") == (openai["choices"][0]["finish_reason"] == "length")
    rendered = server.state.llm.tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    assert body["prompt_eval_count"] == len(server.state.llm.tokenizer.encode(rendered))
    with_logprobs = post(server, "/api/chat", messages=USER, options=options, stream=False, logprobs=True).json()
    assert len(with_logprobs["logprobs"]) == body["eval_count"]
    assert "".join(t["token"] for t in with_logprobs["logprobs"]) == body["message"]["content"]


def test_generate_templated_and_raw(server, tiny_llm) -> None:
    prompt, options = "Once upon a time", {"temperature": 0, "num_predict": 6}
    raw = post(server, "/api/generate", prompt=prompt, raw=True, options=options, stream=False).json()
    check_final(raw)
    assert raw["prompt_eval_count"] == len(tiny_llm.tokenizer.encode(prompt, add_special=True))
    completion = post(server, "/v1/completions", prompt=prompt, max_tokens=6, temperature=0).json()
    assert raw["response"] == completion["choices"][0]["text"]
    assert raw["eval_count"] == completion["usage"]["completion_tokens"]
    _, objects = lines(server, "/api/generate", prompt=prompt, raw=True, options=options)
    assert "".join(o["response"] for o in objects) == raw["response"] and objects[-1]["response"] == ""

    templated = post(server, "/api/generate", prompt=prompt, system="Be brief.", options=options,
                     stream=False).json()
    chat = post(server, "/api/chat", options=options, stream=False, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]).json()
    assert templated["response"] == chat["message"]["content"]  # the chat template, as /api/chat applies it
    assert templated["prompt_eval_count"] == chat["prompt_eval_count"] > raw["prompt_eval_count"]


def test_an_empty_request_is_ollamas_load_the_model(server) -> None:
    for route, body in (("/api/chat", {"messages": []}), ("/api/generate", {})):
        answer = post(server, route, **body, keep_alive=0)
        assert answer.status_code == 200 and answer.json()["done"] is True
        assert answer.json()["done_reason"] == "load"


# -- options --------------------------------------------------------------------------------------------------------
def test_options_map_onto_the_same_sampling_as_the_openai_route(server) -> None:
    messages = [{"role": "user", "content": "Pick words"}]
    cases = [  # Ollama's options, the OpenAI route's fields for the same sampling
        ({"temperature": 1.0, "seed": 3, "num_predict": 12}, {"temperature": 1.0, "seed": 3, "max_tokens": 12}),
        ({"temperature": 1.0, "seed": 3, "top_k": 5, "num_predict": 12},
         {"temperature": 1.0, "seed": 3, "top_k": 5, "max_tokens": 12}),
        ({"temperature": 1.2, "seed": 4, "top_p": 0.5, "min_p": 0.05, "num_predict": 12},
         {"temperature": 1.2, "seed": 4, "top_p": 0.5, "min_p": 0.05, "max_tokens": 12}),
        ({"temperature": 0, "repeat_penalty": 3.0, "num_predict": 12},
         {"temperature": 0, "repetition_penalty": 3.0, "max_tokens": 12}),
    ]
    texts = []
    for options, fields in cases:
        ollama = post(server, "/api/chat", messages=messages, options=options, stream=False).json()
        openai = post(server, "/v1/chat/completions", messages=messages, **fields).json()
        assert ollama["message"]["content"] == openai["choices"][0]["message"]["content"], options
        texts.append(ollama["message"]["content"])
    assert len(set(texts)) == len(texts)  # each option changed the reply: none was dropped on the way
    # top_k 1 at any temperature is the greedy reply
    greedy = post(server, "/api/chat", messages=messages, options={"temperature": 0, "num_predict": 12},
                  stream=False).json()
    top1 = post(server, "/api/chat", messages=messages, options={"temperature": 1.5, "top_k": 1, "seed": 9,
                                                                 "num_predict": 12}, stream=False).json()
    assert top1["message"]["content"] == greedy["message"]["content"]


def test_num_predict_seed_and_stop(server) -> None:
    def reply(**options) -> dict:
        return post(server, "/api/chat", messages=USER, options=options, stream=False).json()

    assert reply(num_predict=3, temperature=0)["eval_count"] <= 3
    assert reply(num_predict=1, temperature=0)["eval_count"] == 1
    texts = {seed: [reply(seed=seed, temperature=1.0, num_predict=12)["message"]["content"] for _ in range(2)]
             for seed in (7, 8)}
    assert texts[7][0] == texts[7][1] and texts[8][0] == texts[8][1] and texts[7][0] != texts[8][0]
    free = reply(temperature=0, num_predict=24)["message"]["content"]
    stop = next(free[i:i + 2] for i in range(4, len(free) - 2) if free[i:i + 2].strip() == free[i:i + 2])
    stopped = reply(temperature=0, num_predict=24, stop=[stop])
    assert stopped["done_reason"] == "stop" and stopped["message"]["content"] == free[:free.index(stop)]
    no_ops = reply(temperature=0, num_predict=24, mirostat=0, typical_p=1.0, presence_penalty=0, frequency_penalty=0)
    assert no_ops["message"]["content"] == free  # options at the value that turns them off are honoured


@pytest.mark.parametrize("stream", [False, True])
def test_format_json_and_a_schema_give_valid_json(server, stream) -> None:
    pytest.importorskip("llguidance")
    for seed, fmt in enumerate(["json", PET, "json", PET]):
        body = {"messages": [{"role": "user", "content": f"pet {seed}"}], "format": fmt,
                "options": {"temperature": 1.0, "seed": seed, "num_predict": 60}}
        if stream:
            objects = lines(server, "/api/chat", **body)[1]
            text, final = "".join(o["message"]["content"] for o in objects), objects[-1]
        else:
            final = post(server, "/api/chat", **body, stream=False).json()
            text = final["message"]["content"]
        assert final["done_reason"] == "stop", text
        document = json.loads(text)
        assert isinstance(document, dict)
        if fmt == PET:
            jsonschema.validate(document, PET)
    generated = post(server, "/api/generate", prompt="x", format=PET, stream=False,
                     options={"temperature": 1.0, "seed": 1, "num_predict": 60}).json()
    jsonschema.validate(json.loads(generated["response"]), PET)


# -- sessions ---------------------------------------------------------------------------------------------------------
def test_a_resent_conversation_reuses_its_kv(server) -> None:
    options = {"temperature": 0, "num_predict": 6}
    first_messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "My name is Bo."}]
    first = post(server, "/api/chat", messages=first_messages, options=options, stream=False)
    assert first.headers["x-kvbound-session-state"] == "new"
    history = first_messages + [first.json()["message"], {"role": "user", "content": "What is my name?"}]
    response, objects = lines(server, "/api/chat", messages=history, options=options)
    assert response.headers["x-kvbound-session"] == first.headers["x-kvbound-session"]
    assert response.headers["x-kvbound-session-state"] == "reused"
    extra, earlier = objects[-1]["kvbound"], first.json()
    assert extra["reused_tokens"] == earlier["prompt_eval_count"] + earlier["eval_count"]  # none of it computed again
    assert extra["refed_history_tokens"] == 0
    assert objects[-1]["prompt_eval_count"] == extra["reused_tokens"] + extra["prefilled_tokens"]
    changed = history[:2] + [{"role": "assistant", "content": "Something else."}] + history[3:]
    assert post(server, "/api/chat", messages=changed, options=options,
                stream=False).headers["x-kvbound-session-state"] == "new"


# -- tools ------------------------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}


def test_tool_calls_and_results_render_as_the_openai_routes_do() -> None:
    ollama = ChatBody.model_validate({"model": "m", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "21 C", "tool_name": "get_weather"},
        {"role": "tool", "content": "25 C"}]})
    openai = ChatRequest.model_validate({"model": "m", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": "21 C", "tool_call_id": "a"},
        {"role": "tool", "content": "25 C", "tool_call_id": "b"}]})
    assert conversation(_messages(ollama), ToolUse.of(ollama)) == conversation(openai.messages, ToolUse.of(openai))


def test_a_reply_under_tools_streams_whole_calls_with_object_arguments() -> None:
    use = ToolUse.of(ChatBody.model_validate({"model": "m", "tools": [WEATHER]}))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    result = SimpleNamespace(text=call, finish_reason="stop", logprobs=None, kvbound={}, prefill_s=0.1,
                             decode_s=0.2, usage={"prompt_tokens": 9, "completion_tokens": 14})
    reply = OllamaReply("m", True, 0, use)
    objects = [o for i in range(0, len(call), 7) for o in reply.piece(call[i:i + 7])] + reply.closing(result)
    said = [o["message"] for o in objects if o["message"]["content"] or o["message"].get("tool_calls")]
    assert said == [{"role": "assistant", "content": "",
                     "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]
    whole = OllamaReply("m", True, 0, use).whole(result)["message"]
    assert whole["tool_calls"] == said[0]["tool_calls"] and whole["content"] == ""
    text = OllamaReply("m", True, 0, use)
    assert [o["message"]["content"] for o in text.piece("It is ") + text.piece("sunny.")] == ["It is ", "sunny."]


# -- the model, errors, the key -------------------------------------------------------------------------------------
def test_model_routes(server) -> None:
    with server.http() as http:
        models = http.get("/api/tags").json()["models"]
        assert [m["name"] for m in models] == ["tiny:latest"] and models[0]["model"] == "tiny:latest"
        assert models[0]["details"]["format"] == "gguf" and models[0]["details"]["family"] == "llama"
        assert models[0]["size"] > 0 and len(models[0]["digest"]) == 64
        shown = http.post("/api/show", json={"model": "tiny:latest"}).json()
        assert shown["model_info"]["llama.context_length"] == server.state.llm.config.max_context
        assert shown["model_info"]["kvbound.session_capacity_tokens"] == server.state.registry.capacity
        running = http.get("/api/ps").json()["models"]
        assert running[0]["size"] > models[0]["size"] and running[0]["context_length"] > 0
        assert http.get("/api/version").json()["version"]
        assert http.get("/").status_code == 200
        assert http.post("/api/chat", json={"model": "tiny:latest", "messages": USER, "stream": False,
                                            "options": {"num_predict": 2}}).status_code == 200


def test_errors_are_ollamas_shape(server) -> None:
    """Validation, a refused option, an unknown model, an unknown route: `{"error": "..."}` (the whole table of bad
    requests, Ollama's among them, is in test_bad_input.py)."""
    for body, status, words in [({"messages": "hi"}, 400, "messages"),
                                ({"messages": USER, "options": {"num_ctx": 4096}}, 400, "options.num_ctx"),
                                ({"messages": USER, "model": "llama3"}, 404, "llama3")]:
        response = post(server, "/api/chat", **body)
        assert response.status_code == status and list(response.json()) == ["error"]
        assert words in response.json()["error"]
    within = post(server, "/api/chat", messages=USER, options={"num_ctx": 512, "num_predict": 2}, stream=False)
    assert within.status_code == 200, within.text  # clients send num_ctx with every request: up to the capacity, met
    missing = httpx.post(server.url + "/api/pull", json={"model": "x"})
    assert missing.status_code == 404 and missing.json() == {"error": "no route POST /api/pull"}


def test_api_key(serve) -> None:
    server = serve(api_key="s3cret")
    with server.http() as http:
        refused = http.get("/api/tags")
        assert refused.status_code == 401 and "no API key" in refused.json()["error"]
        assert http.post("/api/chat", json={"model": "tiny", "messages": USER}).status_code == 401
        assert http.get("/").status_code == 200  # the liveness probe stays open, as /health
        answered = http.post("/api/chat", headers={"authorization": "Bearer s3cret"},
                             json={"model": "tiny", "messages": USER, "stream": False, "options": {"num_predict": 2}})
        assert answered.status_code == 200 and answered.json()["eval_count"] >= 1


# -- the ollama client ----------------------------------------------------------------------------------------------
def test_the_ollama_client_works_unchanged(serve) -> None:
    ollama = pytest.importorskip("ollama")
    server = serve(kv_budget="1MiB", api_key="k")
    client = ollama.Client(host=server.url, headers={"Authorization": "Bearer k"})
    assert [m.model for m in client.list().models] == ["tiny:latest"]
    assert client.show("tiny").modelinfo["general.architecture"] == "llama"
    options = {"temperature": 0, "num_predict": 6}
    reply = client.chat(model="tiny", messages=USER, options=options)
    assert reply.done and reply.message.role == "assistant"
    assert reply.eval_count == 6 or reply.done_reason == "stop"
    pieces = list(client.chat(model="tiny", messages=USER, options=options, stream=True))
    assert "".join(p.message.content for p in pieces) == reply.message.content and pieces[-1].done
    history = USER + [{"role": "assistant", "content": reply.message.content}, {"role": "user", "content": "More"}]
    assert client.chat(model="tiny", messages=history, options=options).message.content is not None
    generated = client.generate(model="tiny", prompt="Once", raw=True, options=options)
    assert generated.response and generated.prompt_eval_count > 0
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="tiny", messages=USER, options={"num_ctx": 8192})
    assert refused.value.status_code == 400 and "options.num_ctx" in refused.value.error
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat(model="llama3", messages=USER)
    assert unknown.value.status_code == 404
