"""The live dashboard: `mount_dashboard(app)` adds GET /dashboard (one static page; its files, chart library
included, under /dashboard/static/) and GET /dashboard/data, which the page polls: the memory document of
/v1/memory plus running totals and the latest memory events. Reads what the server measures; changes nothing."""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from starlette.staticfiles import StaticFiles

if TYPE_CHECKING:
    from kvbound.memory.guard import MemoryEvent
    from kvbound.server.state import Server

ASSETS = Path(__file__).with_name("dashboard")  # index.html, app.js, dashboard.css, vendor/ (uPlot, see its README)
# The page and its files hold no data, so they may be served without the API key (a browser cannot send a bearer
# header when it opens a URL); /dashboard/data needs the key like every other route, and the page sends it.
PUBLIC_PATHS = frozenset({"/dashboard"})
PUBLIC_PREFIXES = ("/dashboard/static/",)
RECENT_EVENTS = 50
EVENT_LEVELS = ("warning", "critical", "refused")  # MemoryEvent.kind


class RecentEvents:
    """The last `limit` memory events of the LLM with their wall-clock times. The LLM calls it from whichever thread
    runs the model (the engine worker here); the lock keeps a snapshot whole."""

    def __init__(self, limit: int = RECENT_EVENTS):
        self._events: deque[dict[str, Any]] = deque(maxlen=limit)
        self._lock = threading.Lock()

    def __call__(self, event: "MemoryEvent") -> None:
        with self._lock:
            self._events.append({"time": time.time(), **event.to_dict()})

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)


def dashboard_data(server: "Server", events: RecentEvents) -> dict[str, Any]:
    """What GET /dashboard/data returns (built on the engine worker, like /v1/memory):

        {"time": server clock (s), "model": id, "memory": the /v1/memory document,
         "totals": {generated_tokens, evicted_tokens, memory_events: {warning, critical, refused}} (since start;
                   the page turns generated_tokens into a rate), "events": [{time, kind, message, ...}] (oldest first)}
    """
    sample = server.metrics.registry.get_sample_value  # the /metrics counters, so the two cannot disagree
    totals = {"generated_tokens": int(sample("kvbound_generated_tokens_total") or 0),
              "evicted_tokens": int(sample("kvbound_evicted_tokens_total") or 0),
              "memory_events": {level: int(sample("kvbound_memory_events_total", {"level": level}) or 0)
                                for level in EVENT_LEVELS}}
    return {"time": time.time(), "model": server.model_id, "memory": server.memory(), "totals": totals,
            "events": events.snapshot()}


def mount_dashboard(app: FastAPI) -> None:
    """Add the dashboard's routes to an app from `create_app` (its `app.state.kvbound`, a server.state.Server)."""
    server: "Server" = app.state.kvbound
    server.make_public(PUBLIC_PATHS, PUBLIC_PREFIXES)  # the page and its files; the data route keeps the API key
    events = server.llm.on_memory_event(RecentEvents())

    @app.get("/dashboard", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(ASSETS / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/data", include_in_schema=False)
    async def data() -> JSONResponse:
        document = await server.worker.call(lambda: dashboard_data(server, events))
        return JSONResponse(document, headers={"Cache-Control": "no-store"})

    app.mount("/dashboard/static", StaticFiles(directory=ASSETS), name="dashboard-static")
