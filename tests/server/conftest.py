"""A real uvicorn on 127.0.0.1 (a free port, in a thread) serving a tiny random-weight model, so each server test
runs the whole stack — HTTP, sessions, the engine worker, the shared KV pool — in well under a second."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install -e '.[serve,test]'")

import httpx  # noqa: E402
import openai  # noqa: E402
import uvicorn  # noqa: E402

import kvbound  # noqa: E402
from kvbound.server import ServerSettings, create_app  # noqa: E402

# The tiny vocabulary's special tokens (<|endoftext|>, <|im_start|>, <|im_end|>) banned: a reply then runs to exactly
# max_tokens, which makes lengths, timings and the pool's block counts predictable.
NO_STOP = {"0": -100, "1": -100, "2": -100}
TINY_CONTEXT = 1024


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a thread, for as long as the `with` block lasts."""

    def __init__(self, app: Any):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def state(self) -> Any:
        """The app's kvbound.server.state.Server (registry, worker, pool) — read-only use in assertions."""
        return self.app.state.kvbound

    def openai(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def http(self, **options: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **options)

    def memory(self) -> dict[str, Any]:
        return httpx.get(self.url + "/v1/memory", timeout=60).json()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers_tiny import tiny_hf_model, write_gguf

    path = tmp_path_factory.mktemp("server-model") / "tiny.gguf"
    write_gguf(tiny_hf_model("llama", max_position_embeddings=TINY_CONTEXT), path)
    return path


@pytest.fixture(scope="session")
def tiny_llm(tiny_model: Path) -> kvbound.LLM:
    return kvbound.load(tiny_model, device="cpu")


@pytest.fixture
def serve(tiny_llm: kvbound.LLM) -> Iterator[Callable[..., LiveServer]]:
    """Start a server with these ServerSettings (and store); stopped after the test."""
    started: list[LiveServer] = []

    def start(store: Any = None, llm: kvbound.LLM | None = None, **settings: Any) -> LiveServer:
        live = LiveServer(create_app(llm or tiny_llm, ServerSettings(**settings), store)).__enter__()
        started.append(live)
        return live

    yield start
    for live in started:
        live.__exit__()


@pytest.fixture(scope="module")
def smollm2_server(smollm2_gguf: Path) -> Iterator[LiveServer]:
    """One server per test module on the default model, with a 64 MiB pool."""
    llm = kvbound.load(smollm2_gguf, device="cpu")
    with LiveServer(create_app(llm, ServerSettings(kv_budget="64MiB"))) as live:
        yield live


@pytest.fixture(scope="module")
def server(tiny_llm: kvbound.LLM) -> Iterator[LiveServer]:
    """One server per test module: a 1 MiB pool (64 blocks of 32 tokens) shared by every session."""
    with LiveServer(create_app(tiny_llm, ServerSettings(kv_budget="1MiB"))) as live:
        yield live
