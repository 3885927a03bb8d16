"""kvbound's HTTP server (the `serve` extra): an OpenAI-compatible API whose sessions keep their KV cache between
requests inside one shared, bounded KV pool. `create_app(llm, ServerSettings(...))` builds the app; `run` serves it."""

from kvbound.server.app import create_app
from kvbound.server.http import run
from kvbound.server.settings import ServerSettings

__all__ = ["create_app", "run", "ServerSettings"]
