"""logprobs / top_logprobs against a real uvicorn: OpenAI's shapes (validated strictly with the openai SDK's models),
on chat and text completions, streamed and not; values consistent with the tokens sampled (greedy: the sampled
token is the likeliest), alternatives sorted and as many as asked, the tokens' bytes spelling the reply, and each
streamed chunk carrying the logprobs of its own text."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def post_both(server, path: str, body: dict) -> tuple[dict, list[dict]]:
    """The reply to `body`, and the chunks of the same request streamed."""
    with server.http() as http:
        whole = http.post(path, json=body)
        assert whole.status_code == 200, whole.text
        with http.stream("POST", path, json={**body, "stream": True}) as response:
            data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return whole.json(), [json.loads(d) for d in data[:-1]]


@pytest.mark.parametrize("top", [0, 3])
def test_chat_logprobs_greedy_streamed_and_not(server, top) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12,
            "temperature": 0, "logprobs": True, "top_logprobs": top}
    whole, chunks = post_both(server, CHAT, body)
    ChatCompletion.model_validate(whole, strict=True)
    choice = whole["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["logprobs"]["refusal"] is None and content
    assert b"".join(bytes(e["bytes"]) for e in content) == choice["message"]["content"].encode()
    assert "".join(e["token"] for e in content) == choice["message"]["content"]  # ASCII vocabulary: no split bytes
    stop = 1 if choice["finish_reason"] == "stop" else 0  # the end token is not part of the reply
    assert len(content) == whole["usage"]["completion_tokens"] - stop
    for entry in content:
        assert len(entry["top_logprobs"]) == top
        values = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        assert entry["logprob"] <= 0
        if top:  # greedy: the sampled token is (one of) the likeliest
            assert entry["logprob"] == pytest.approx(values[0])
    streamed = []
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk, strict=True)
        if not chunk["choices"] or chunk["choices"][0]["logprobs"] is None:
            continue
        delta, logprobs = chunk["choices"][0]["delta"], chunk["choices"][0]["logprobs"]["content"]
        assert b"".join(bytes(e["bytes"]) for e in logprobs) == delta.get("content", "").encode()  # its own tokens
        streamed += logprobs
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content])


def test_chat_without_logprobs_says_null(server) -> None:
    whole, chunks = post_both(server, CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                             "max_tokens": 3, "logprobs": False})
    assert whole["choices"][0]["logprobs"] is None
    assert all(c["choices"][0]["logprobs"] is None for c in chunks if c["choices"])


def test_completion_logprobs_streamed_and_not(server) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "logprobs": 2}
    whole, chunks = post_both(server, COMPLETIONS, body)
    Completion.model_validate(whole, strict=True)
    choice = whole["choices"][0]
    logprobs, text = choice["logprobs"], choice["text"]
    tokens = logprobs["tokens"]
    assert "".join(tokens) == text and len(tokens) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
    assert logprobs["text_offset"] == [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    for token, value, top in zip(tokens, logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert token in top and top[token] == value and len(top) <= 3  # up to logprobs + the sampled token
        assert value == pytest.approx(max(top.values()))  # greedy
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in chunks:
        if chunk["choices"] and chunk["choices"][0]["logprobs"] is not None:
            part = chunk["choices"][0]["logprobs"]
            assert "".join(part["tokens"]) == chunk["choices"][0]["text"]
            for key in streamed:
                streamed[key] += part[key]
    assert streamed["tokens"] == tokens and streamed["text_offset"] == logprobs["text_offset"]
    assert streamed["token_logprobs"] == pytest.approx(logprobs["token_logprobs"])


def test_sampled_logprobs_match_the_sampled_tokens(server) -> None:
    """At temperature 1 the sampled token is often not the likeliest: the value reported is that token's own."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Write"}], "max_tokens": 16,
            "temperature": 1.0, "seed": 5, "logprobs": True, "top_logprobs": 20}
    whole, _ = post_both(server, CHAT, body)
    content = whole["choices"][0]["logprobs"]["content"]
    below = 0
    for entry in content:
        alternatives = {alt["token"]: alt["logprob"] for alt in entry["top_logprobs"]}
        if entry["token"] in alternatives:
            assert alternatives[entry["token"]] == pytest.approx(entry["logprob"])
        below += entry["logprob"] < entry["top_logprobs"][0]["logprob"] - 1e-6
    assert below  # some sampled token was not the likeliest
