"""The default model (SmolLM2-135M-Instruct) behind the server, driven by the openai client as an application
would: streamed replies, and a second request that resends the whole history continues the same KV cache."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvbound
from kvbound.server import ServerSettings, create_app
from tests.server.conftest import LiveServer


@pytest.fixture(scope="module")
def smollm2_server(smollm2_gguf: Path):
    llm = kvbound.load(smollm2_gguf, device="cpu")
    with LiveServer(create_app(llm, ServerSettings(kv_budget="64MiB"))) as live:
        yield live


def streamed(client, messages):
    """One streamed, greedy turn: (text, usage, response headers, the final chunk's kvbound figures)."""
    raw = client.chat.completions.with_raw_response.create(
        model="default", messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    figures = next(c.model_extra["kvbound"] for c in chunks if c.model_extra.get("kvbound"))
    return text, chunks[-1].usage, raw.headers, figures


@pytest.mark.model
def test_openai_client_streams_and_the_history_reuses_the_cache(smollm2_server) -> None:
    client = smollm2_server.openai()
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}]
    text, usage, headers, _ = streamed(client, messages)
    assert "paris" in text.lower()
    assert headers["x-kvbound-session-state"] == "new"

    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "And of Italy?"}]
    second, second_usage, second_headers, figures = streamed(client, messages)
    assert second.strip()
    assert second_headers["x-kvbound-session"] == headers["x-kvbound-session"]
    assert second_headers["x-kvbound-session-state"] == "reused"
    # Nothing of the first turn was computed again: the cache held all of it, prompt and reply.
    assert int(second_headers["x-kvbound-reused-tokens"]) == usage.total_tokens
    assert second_usage.prompt_tokens_details.cached_tokens == usage.total_tokens
    assert second_usage.prompt_tokens - usage.total_tokens == figures["prefilled_tokens"] < 25  # the new message
    assert figures["reprefilled_tokens"] == 0 and figures["refed_history_tokens"] == 0
