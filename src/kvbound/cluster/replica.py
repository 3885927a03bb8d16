"""One kvbound server inside a Ray Serve replica: it loads the model, builds the single-process app
(kvbound.server.create_app: its own KV pool of the configured budget, sessions, engine worker, metrics) on the
shared SessionStore, and answers what the ingress forwards by running the request through that app in process.
Besides HTTP it answers the ingress's control calls: ping, report (its load, for placement), release and adopt
(a session moving off or onto it). Owns no routing; never touches another replica."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, AsyncIterator

import ray

from kvbound.cluster.forward import Forwarded, Head, call_asgi
from kvbound.cluster.routing import Report
from kvbound.server.sessions import split_system

if TYPE_CHECKING:
    from kvbound.cluster.config import ClusterConfig
    from kvbound.server.sessions import Session

READ_ATTEMPTS = 4


class KvboundReplica:
    """The class Serve deploys once per replica (`build_app` names each deployment `replica-<i>`)."""

    def __init__(self, name: str, config: "ClusterConfig"):
        import kvbound
        from kvbound.server import create_app
        from kvbound.server.sessions import open_store

        self.name = name
        # A replica is the process's owner, like `kvbound serve`: loading may tune glibc's allocator.
        llm = kvbound.load(config.model, tune_allocator=True, **config.load_options)
        self.store = open_store(config.settings.data_dir)
        self.app = create_app(llm, config.settings, self.store)
        self.server = self.app.state.kvbound
        self._started: asyncio.Future | None = None

    async def _start(self) -> None:
        """Enter the app's lifespan (it starts the engine worker) on the loop that runs the calls, once."""
        if self._started is None:
            self._lifespan = self.app.router.lifespan_context(self.app)
            self._started = asyncio.ensure_future(self._lifespan.__aenter__())
        await self._started

    async def close(self) -> None:
        """Leave the app's lifespan: generations in progress are cancelled (their turns roll back)."""
        if self._started is not None:
            await self._lifespan.__aexit__(None, None, None)
            self._started = None
        self.store.close()

    def __del__(self) -> None:  # Serve's replica shutdown: stop the engine thread with the process
        worker = getattr(getattr(self, "server", None), "worker", None)
        if worker is not None and getattr(self, "_started", None) is not None:
            worker.stop()

    # -- HTTP ---------------------------------------------------------------------------------------------------
    async def forward(self, request: Forwarded, adopt: str | None = None) -> AsyncIterator[Head | bytes]:
        """The app's response to `request` (its Head first, then body chunks). `adopt`: a named session the ingress
        moves here; a stale copy this replica kept from before is first brought up to the shared store's."""
        await self._start()
        if adopt is not None:
            await self.server.worker.call(lambda: self._adopt(adopt))
        first = True
        async for part in call_asgi(self.app, request):
            if first:
                part.headers.append(("x-kvbound-replica", self.name))
                first = False
            yield part

    # -- control ------------------------------------------------------------------------------------------------
    async def ping(self) -> dict[str, Any]:
        """Alive, and who: the ingress notices a restarted replica by its new actor name."""
        return {"replica": self.name, "actor": _actor_name(), "pid": os.getpid()}

    async def report(self) -> Report:
        """Its load now. Read here, beside the engine thread rather than on it: a call on the worker waits for the
        step in progress (a prefill: hundreds of ms) and placement would wait with it. The figures are advice for
        placement only (the replica's own admission decides, and answers 429), so a read the worker's writes
        disturbed is simply read again."""
        await self._start()
        for _ in range(READ_ATTEMPTS - 1):
            try:
                return self._report()
            except (RuntimeError, AttributeError):  # a dict resized or a chat dropped mid-read
                await asyncio.sleep(0)
        return await self.server.worker.call(self._report)  # on the worker: consistent, after its step

    async def release(self, session_id: str) -> None:
        """A session moved to another replica: give its KV blocks back to this pool (its messages stay in memory
        until a later `adopt` here refreshes them from the store)."""
        def offload() -> None:
            session = self._local(session_id)
            if session is not None and not session.busy:
                self.server.registry.offload(session)

        await self._start()
        await self.server.worker.call(offload)

    # -- the server's state (`_report` beside the engine worker; the others on it) ------------------------------
    def _report(self) -> Report:
        server = self.server
        registry, admission, worker = server.registry, server.admission, server.worker
        pool, settings = registry.pool, server.settings
        sessions = registry.sessions()
        idle_blocks = sum(s.kv_blocks for s in sessions if not s.busy)
        return Report(self.name, blocks=pool.num_blocks, free_blocks=pool.free_blocks,
                      available_blocks=admission.available_blocks,
                      reclaimable_blocks=admission.available_blocks + idle_blocks,
                      block_tokens=pool.spec.block_size, block_bytes=pool.spec.bytes_per_block,
                      sessions=len(sessions),
                      droppable_sessions=sum(1 for s in sessions if not s.explicit and not s.busy),
                      max_sessions=settings.max_sessions, active=worker.active, queued=worker.queued,
                      max_queued=settings.max_queued, actor=_actor_name(), pid=os.getpid())

    def _local(self, session_id: str) -> "Session | None":
        return next((s for s in self.server.registry.sessions() if s.id == session_id), None)

    def _adopt(self, session_id: str) -> None:
        """Bring this replica's copy of a named session up to the store's, if another replica answered turns of it
        since this one last did: its KV goes back to the pool and its messages become the stored ones, so its next
        turn restores from the store's snapshot (SessionRegistry.restore). A copy that matches is kept, KV and all.

        This writes the Session's fields from outside SessionRegistry (server/sessions.py belongs to the
        single-process server); a `SessionRegistry.refresh(session_id)` there would be the right home."""
        session = self._local(session_id)
        if session is None or session.busy or not session.explicit:
            return
        try:
            stored = self.store.get_messages(session_id)
        except LookupError:  # deleted from the store since (through another replica): forget this copy too
            self.server.registry.delete(session_id)
            return
        if stored == session.messages:
            return
        self.server.registry.offload(session)
        system, turns = split_system(stored)
        session.system, session.messages = system, stored
        session.turns = sum(1 for m in turns if m["role"] == "assistant")


def _actor_name() -> str:
    """This replica's Ray actor name ('' outside Ray: an in-process replica in tests)."""
    return (ray.get_runtime_context().get_actor_name() or "") if ray.is_initialized() else ""
