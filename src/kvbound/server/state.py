"""What the routes of one app share (`Server`, kept on `app.state.kvbound`): the LLM, settings, session registry,
pool admission, engine worker, metrics, and which paths are served without the API key. Built by `create_app`;
read by the routes and by what mounts more of them (server.dashboard)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from kvbound.server.memory import memory_document

if TYPE_CHECKING:
    from kvbound.llm import LLM
    from kvbound.server.admission import PoolAdmission
    from kvbound.server.metrics import Metrics
    from kvbound.server.scheduler import Worker
    from kvbound.server.sessions import SessionRegistry
    from kvbound.server.settings import ServerSettings


@dataclass
class Server:
    llm: "LLM"
    settings: "ServerSettings"
    registry: "SessionRegistry"
    admission: "PoolAdmission"
    worker: "Worker"
    metrics: "Metrics"
    model_id: str
    # Served without the API key: liveness probes; routes mounted later (a static page) add theirs (make_public).
    public_paths: set[str] = field(default_factory=lambda: {"/health"})
    public_prefixes: list[str] = field(default_factory=list)

    def memory(self) -> dict[str, Any]:
        return memory_document(self.llm, self.registry.pool, self.registry, self.admission, self.worker)

    def make_public(self, paths: Iterable[str] = (), prefixes: Iterable[str] = ()) -> None:
        """Serve `paths` (exact) and every path under `prefixes` without the API key."""
        self.public_paths |= set(paths)
        self.public_prefixes.extend(prefixes)

    def is_public(self, path: str) -> bool:
        return path in self.public_paths or path.startswith(tuple(self.public_prefixes))
