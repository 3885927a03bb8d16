"""The unmodified `openai` client against the server: models, chat completions (plain and streamed), raw
completions, the sampling fields (max_tokens, max_completion_tokens, stop, seed) and OpenAI's error statuses."""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.conftest import NO_STOP


def ask(client: openai.OpenAI, text: str, **options):
    options.setdefault("temperature", 0)
    options.setdefault("extra_body", {})
    options["extra_body"].setdefault("logit_bias", NO_STOP)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], **options)


def test_models_list_and_lookup(server) -> None:
    client = server.openai()
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_reply_usage_and_length(server) -> None:
    reply = ask(server.openai(), "Hello there", max_tokens=5)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    raw = choice.message.model_dump()  # the fields OpenAI's schema requires (refusal: nullable)
    assert raw["refusal"] is None and raw["annotations"] == []
    usage = reply.usage
    assert usage.completion_tokens == 5 and usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0  # a new session: nothing was cached


def test_max_completion_tokens_is_honoured(server) -> None:
    assert ask(server.openai(), "Count", max_completion_tokens=3).usage.completion_tokens == 3


def test_stream_carries_the_same_reply(server) -> None:
    client = server.openai()
    whole = ask(client, "Tell me a story", max_tokens=12)
    chunks = list(ask(client, "Tell me a story", max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # streamed, not one blob
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_stream_is_server_sent_events_ending_with_done(server) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True,
            "temperature": 0, "logit_bias": NO_STOP}
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["kvbound"]["session_id"] == response.headers["x-kvbound-session"]


def test_stop_string_ends_the_reply(server) -> None:
    client = server.openai()
    free = ask(client, "Say something long", max_tokens=24).choices[0].message.content
    stop = next(free[i:i + 2] for i in range(4, len(free) - 2) if free[i:i + 2].strip() == free[i:i + 2])
    stopped = ask(client, "Say something long", max_tokens=24, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == free[:free.index(stop)]


def test_seed_makes_sampling_reproducible(server) -> None:
    client = server.openai()
    texts = {seed: [ask(client, "Pick words", max_tokens=12, temperature=1.0, seed=seed).choices[0].message.content
                    for _ in range(2)] for seed in (7, 8)}
    assert texts[7][0] == texts[7][1] and texts[8][0] == texts[8][1]
    assert texts[7][0] != texts[8][0]


def test_raw_completions_plain_and_streamed(server, tiny_llm) -> None:
    client = server.openai()
    prompt = "Once upon a time"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"logit_bias": NO_STOP})
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(tiny_llm.tokenizer.encode(prompt, add_special=True))
    assert whole.usage.completion_tokens == 6
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=6, temperature=0, stream=True, extra_body={"logit_bias": NO_STOP})]
    assert "".join(pieces) == whole.choices[0].text


def test_default_model_alias_is_accepted(server) -> None:
    reply = server.openai().chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}],
                                                    max_tokens=1)
    assert reply.usage.completion_tokens == 1


def test_openai_errors(server) -> None:
    client = server.openai()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=2.5)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5000)


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_responses_match_the_openai_sdk_models_strictly(server, route) -> None:
    """The raw JSON of a reply, streamed and not, validates against the openai SDK's own response models in strict
    mode (every required field present, every type exact): what clients that parse responses depend on."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    path, model, chunk_model = {"chat": ("/v1/chat/completions", ChatCompletion, ChatCompletionChunk),
                                "completions": ("/v1/completions", Completion, Completion)}[route]
    body = {"model": "tiny", "max_tokens": 4, "temperature": 0, "logit_bias": NO_STOP}
    body |= {"messages": [{"role": "user", "content": "Hi"}]} if route == "chat" else {"prompt": "Hi"}
    with server.http() as http:
        reply = http.post(path, json=body).json()
        with http.stream("POST", path, json={**body, "stream": True,
                                             "stream_options": {"include_usage": True}}) as response:
            data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    model.model_validate(reply, strict=True)
    if route == "chat":
        message = reply["choices"][0]["message"]
        assert message["refusal"] is None and message["annotations"] == [] and message["role"] == "assistant"
    assert data[-1] == "[DONE]" and len(data) >= 3
    for chunk in map(json.loads, data[:-1]):
        if route == "completions" and any(c["finish_reason"] is None for c in chunk["choices"]):
            continue  # the SDK's Completion model demands a finish reason; OpenAI streams null ones too
        chunk_model.model_validate(chunk, strict=True)
    assert json.loads(data[-2])["usage"]["completion_tokens"] == 4
