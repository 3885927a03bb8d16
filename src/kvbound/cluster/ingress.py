"""The cluster's HTTP entry (a Ray Serve deployment, one replica): the same OpenAI-compatible API as
`kvbound serve`, each request forwarded through a DeploymentHandle to the kvbound replica that should answer it.

* Affinity: a chat request goes to the replica holding its conversation (routing.affinity_key → SessionTable).
* Placement: a new session goes to the replica with the most free KV blocks (each replica's report); when none
  can take it, 429 with every replica's numbers.
* Failover: a replica that dies, stops answering pings or refuses a turn for want of KV (429) loses its sessions
  to the next best replica; a named session is restored there from the shared SessionStore (`adopt`), a session
  found by history is rebuilt from the history the client sends. A request is retried only before any byte of
  its answer went out, so a turn is answered once or not at all.
* Cluster views: /v1/memory, /metrics, /v1/sessions and /dashboard/data merge every replica's (aggregate).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from typing import Any, AsyncIterator

import ray
from prometheus_client import CollectorRegistry, Counter as PromCounter, Gauge, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvbound.cluster import aggregate
from kvbound.cluster.config import ClusterConfig
from kvbound.cluster.forward import Forwarded, Head
from kvbound.cluster.routing import (Report, SessionTable, affinity_key, cluster_full_message, explicit_id, rank,
                                     session_key)
from kvbound.kvcache.spec import format_bytes
from kvbound.server.metrics import CONTENT_TYPE
from kvbound.server.protocol import error_body

logger = logging.getLogger("kvbound.cluster")
ROUTE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class ReplicaGone(Exception):
    """The replica died or stopped answering before it began a response."""


class ClusterMetrics:
    """The ingress's own metrics (its own registry), appended to the replicas' in GET /metrics."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.up = Gauge("kvbound_cluster_replica_up", "1 while the replica answers pings", ["replica"], registry=r)
        self.routed = PromCounter("kvbound_cluster_routed", "Requests forwarded, by replica and why it was chosen "
                                  "(affinity, placed, moved, any)", ["replica", "reason"], registry=r)
        self.failovers = PromCounter("kvbound_cluster_failovers", "Requests moved off a replica (cause: gone, full)",
                                     ["replica", "cause"], registry=r)
        self.refused = PromCounter("kvbound_cluster_refused", "Requests refused because every replica was full",
                                   registry=r)
        self.table = Gauge("kvbound_cluster_routed_sessions", "Affinity keys in the session table", registry=r)
        self.route_seconds = Histogram("kvbound_cluster_route_seconds", "Time the ingress spent choosing a replica "
                                       "(placement reads every replica's report)", buckets=ROUTE_BUCKETS, registry=r)


class Ingress:
    """Serve calls `__call__` with every HTTP request; `build_app` hands it one DeploymentHandle per replica."""

    def __init__(self, replicas: list[Any], config: ClusterConfig):
        self.config = config
        self.handles = dict(zip(config.replica_names, replicas))
        self.table = SessionTable()
        self.down: dict[str, float] = {}  # replica → since when (monotonic)
        self.identity: dict[str, dict[str, Any]] = {}  # replica → its last ping (actor, pid)
        self.load: Counter[str] = Counter()  # requests in flight per replica
        self.metrics = ClusterMetrics()
        self._monitor: asyncio.Task | None = None

    # -- HTTP -----------------------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._watch())
        path = request.scope["path"]
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        method = request.method
        if path == "/health" and method == "GET":
            if not self.identity:  # the first request: the monitor has not pinged yet
                await asyncio.gather(*(self._ping(n) for n in self.handles))
            return self._health()
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        forwarded = Forwarded.of(method, path, request.url.query, request.headers.items(), body)
        if path == "/v1/chat/completions" and method == "POST":
            return await self._chat(forwarded)
        if path == "/v1/sessions":
            return await (self._list_sessions(forwarded) if method == "GET" else self._create_session(forwarded))
        if path.startswith("/v1/sessions/") and method in ("GET", "DELETE"):
            return await self._by_id(forwarded, path.removeprefix("/v1/sessions/"))
        if method == "GET" and path in ("/v1/memory", "/metrics", "/dashboard/data"):
            return await self._merged(forwarded)
        return await self._any(forwarded)  # models, completions, the dashboard's files, errors

    async def _body(self, request: Request) -> bytes | Response:
        """The request body, refused (413) past the replicas' --max-body before it is all read."""
        limit = self.config.settings.max_body_bytes
        length = request.headers.get("content-length", "")
        chunks, size = [], int(length) if length.isdigit() else 0
        if size <= limit:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    break
                chunks.append(chunk)
        if size > limit:
            message = (f"the request body is {size:,} bytes or more and the limit is {limit:,} bytes "
                       f"({format_bytes(limit)}); send less or raise --max-body")
            return JSONResponse(error_body(message, code="request_too_large"), status_code=413)
        return b"".join(chunks)

    def _health(self) -> Response:
        replicas = [{"replica": name, "up": name not in self.down, **self.identity.get(name, {})}
                    for name in self.handles]
        up = sum(r["up"] for r in replicas)
        status = "ok" if up == len(replicas) else "degraded" if up else "down"
        return JSONResponse({"status": status, "replicas": replicas, "routed_sessions": len(self.table)},
                            status_code=200 if up else 503)

    # -- chat: affinity, placement, failover ----------------------------------------------------------------------
    async def _chat(self, request: Forwarded) -> Response:
        key = affinity_key(_json(request.body))
        if key is None:
            return await self._any(request)
        self.table.in_flight[key] += 1
        ended = False

        def end() -> None:  # once the answer is out (a stream: once it ends)
            nonlocal ended
            if not ended:
                ended = True
                self.table.in_flight[key] -= 1
                if self.table.in_flight[key] <= 0:
                    del self.table.in_flight[key]
                self.metrics.table.set(len(self.table))

        try:
            response = await self._route(request, key, end)
        except BaseException:
            end()
            raise
        if not isinstance(response, StreamingResponse):
            end()
        return response

    async def _route(self, request: Forwarded, key: str, end: Any) -> Response:
        named = explicit_id(key)
        home = self.table.owner(key)  # where the session was before this request
        tried: set[str] = set()
        said: dict[str, str] = {}  # replica → its own 429 message
        while True:
            started = time.perf_counter()
            owner = self.table.owner(key)
            if owner is not None and owner not in tried and owner not in self.down:
                name, reason = owner, "affinity"
            else:
                reports = await self._reports(exclude=tried)
                ranked = [r for r in rank(reports, self.table.counts()) if r.refusal() is None]
                if not ranked:
                    self._restore_owner(key, home)
                    if tried:  # the 429 shows every replica's numbers, those that refused included
                        reports = await self._reports(exclude=())
                    return self._full(reports, said) if reports or said else self._unavailable()
                name, reason = ranked[0].replica, "placed" if home is None else "moved"
                self.table.assign(key, name)  # now: placements running beside this one count it (rank's tie-break)
            self.metrics.route_seconds.observe(time.perf_counter() - started)
            try:
                head, parts = await self._open(name, request, adopt=named if name != home else None)
            except ReplicaGone:
                tried.add(name)
                self.metrics.failovers.labels(name, "gone").inc()
                continue
            if head.status == 429 and self.table.in_flight[key] == 1:  # full (not: this session answers another)
                parts.cancel()
                self._release(name)
                tried.add(name)
                said[name] = _message(head.body)
                self.metrics.failovers.labels(name, "full").inc()
                continue
            if head.status < 300:
                self.table.assign(key, name)
                if (session := head.header("x-kvbound-session")) is not None:
                    self.table.assign(session_key(session), name)
                if named is not None and home is not None and home != name and home not in self.down:
                    self._fire(self.handles[home].release.remote(named))  # its KV back to the old replica's pool
            self.metrics.routed.labels(name, reason).inc()
            return self._respond(name, head, parts, on_end=end)

    def _restore_owner(self, key: str, home: str | None) -> None:
        """No replica took the request: the key goes back to where it was (a new one is forgotten)."""
        if home is None:
            self.table.forget(key)
        else:
            self.table.assign(key, home)

    def _full(self, reports: list[Report], said: dict[str, str] | None = None) -> Response:
        self.metrics.refused.inc()
        answered = {r.replica for r in reports} | set(said or {})
        message = cluster_full_message(reports, down=[n for n in self.handles if n not in answered], said=said)
        body = {**error_body(message, type="server_busy", code="server_busy"),
                "kvbound": {"replicas": [r.to_dict() for r in reports]}}
        return JSONResponse(body, status_code=429, headers={"Retry-After": "1"})

    # -- sessions -------------------------------------------------------------------------------------------------
    async def _create_session(self, request: Forwarded) -> Response:
        body = _json(request.body)
        wanted = body.get("session_id") if isinstance(body, dict) else None
        owner = self.table.owner(session_key(wanted)) if isinstance(wanted, str) else None
        candidates = [owner] if owner is not None and owner not in self.down else []
        candidates += [r.replica for r in rank(await self._reports(exclude=set(candidates)), self.table.counts())
                       if r.refusal() is None]
        for name in candidates:
            try:
                head = await self._collect(name, request)
            except ReplicaGone:
                continue
            if head.status == 201:
                self.table.assign(session_key(json.loads(head.body)["id"]), name)
            if head.status != 429:
                return self._respond(name, head)
        return self._full(await self._reports(exclude=()))

    async def _by_id(self, request: Forwarded, session_id: str) -> Response:
        """GET or DELETE one session: on its replica; unknown here, on each replica in placement order until one
        has it (a named session is in the shared store, so the first does; one found by history lives in one
        replica's memory only). A DELETE also drops the stale copies other replicas may keep."""
        key = session_key(session_id)
        owner = self.table.owner(key)
        order = [owner] if owner is not None and owner not in self.down else []
        order += [r.replica for r in rank(await self._reports(exclude=set(order)), self.table.counts())]
        answer: tuple[str, Head] | None = None
        for name in order:
            try:
                head = await self._collect(name, request, adopt=session_id if name != owner else None)
            except ReplicaGone:
                continue
            answer = (name, head)
            if head.status != 404:
                break
        if answer is None:
            return self._unavailable()
        name, head = answer
        if head.status == 200 and request.method == "GET":
            self.table.assign(key, name)
        elif head.status == 200:
            self.table.forget(key)
            others = [n for n in self.handles if n != name and n not in self.down]
            await asyncio.gather(*(self._collect(n, request) for n in others), return_exceptions=True)
        elif head.status == 404:
            self.table.forget(key)
        return self._respond(name, head)

    async def _list_sessions(self, request: Forwarded) -> Response:
        answers = await self._each(request)
        refused = _first_error(answers)
        if refused is not None:
            return self._respond(*refused)
        listings = {name: json.loads(head.body)["data"] for name, head in answers.items()}
        data = aggregate.merge_sessions(listings, lambda i: self.table.owner(session_key(i)))
        return JSONResponse({"object": "list", "data": data})

    # -- cluster views --------------------------------------------------------------------------------------------
    async def _merged(self, request: Forwarded) -> Response:
        answers = await self._each(request)
        refused = _first_error(answers)
        if refused is not None:
            return self._respond(*refused)
        if not answers:
            return self._unavailable()
        down = [n for n in self.handles if n not in answers]
        if request.path == "/metrics":
            texts = {name: head.body.decode() for name, head in answers.items()}
            for name in self.handles:
                self.metrics.up.labels(name).set(0 if name in self.down else 1)
            return Response(aggregate.merge_metrics(texts, self.metrics.registry), media_type=CONTENT_TYPE)
        documents = {name: json.loads(head.body) for name, head in answers.items()}
        if request.path == "/dashboard/data":
            return JSONResponse(aggregate.merge_dashboard(documents, down), headers={"Cache-Control": "no-store"})
        return JSONResponse(aggregate.merge_memory(documents, down))

    async def _any(self, request: Forwarded) -> Response:
        """A request no session owns: the replica with the fewest requests in flight from here."""
        for name in sorted((n for n in self.handles if n not in self.down), key=lambda n: (self.load[n], n)):
            try:
                head, parts = await self._open(name, request)
            except ReplicaGone:
                continue
            self.metrics.routed.labels(name, "any").inc()
            return self._respond(name, head, parts)
        return self._unavailable()

    def _unavailable(self) -> Response:
        message = f"no replica answers ({', '.join(sorted(self.down)) or 'none'} down); retry shortly"
        return JSONResponse(error_body(message, type="server_error", code="replicas_unavailable"), status_code=503,
                            headers={"Retry-After": "1"})

    # -- talking to replicas --------------------------------------------------------------------------------------
    async def _open(self, name: str, request: Forwarded, adopt: str | None = None) -> tuple[Head, Any]:
        """Forward `request` to replica `name` and wait for the head of its answer, pinging the replica while the
        wait lasts (a generation may take long; a dead replica's queue never moves). ReplicaGone: it died or did
        not answer a ping, and it is marked down until a ping succeeds again."""
        parts = self.handles[name].options(stream=True).forward.remote(request, adopt)
        self.load[name] += 1
        first = asyncio.ensure_future(parts.__anext__())
        first.add_done_callback(_retrieved)  # cancelled below, it may still end in Serve's RequestCancelledError
        try:
            while True:
                done, _ = await asyncio.wait({first}, timeout=self.config.probe_interval_s)
                if done:
                    return first.result(), parts
                if not await self._ping(name):
                    raise ReplicaGone(name)
        except (ReplicaGone, ray.exceptions.RayError, StopAsyncIteration) as error:
            first.cancel()
            parts.cancel()
            self._release(name)
            if not isinstance(error, ray.exceptions.RayTaskError):  # an actor's death, not a bug in forward()
                self._mark_down(name, error)
            else:
                logger.error("replica %s failed a request", name, exc_info=error)
            raise ReplicaGone(name) from None
        except BaseException:
            first.cancel()
            parts.cancel()
            self._release(name)
            raise

    def _release(self, name: str) -> None:
        self.load[name] -= 1

    def _respond(self, name: str, head: Head, parts: Any = None, on_end: Any = None) -> Response:
        """The client's response: whole when the head holds all of it (`parts` None: already collected), else
        streamed as the replica produces it. Either way the replica's request ends with the response."""
        headers = {k: v for k, v in head.headers if k not in ("content-length", "transfer-encoding", "connection")}
        if parts is None or not head.more:
            if parts is not None:
                self._release(name)
            if on_end is not None:
                on_end()
            return Response(head.body, status_code=head.status, headers=headers)

        async def stream() -> AsyncIterator[bytes]:
            finished = False
            try:
                if head.body:
                    yield head.body
                async for chunk in parts:
                    yield chunk
                finished = True
            except Exception as error:  # noqa: BLE001 — the replica died mid-answer: end the stream in OpenAI's way
                logger.warning("replica %s failed mid-response: %s", name, error)
                if headers.get("content-type", "").startswith("text/event-stream"):
                    message = f"the replica answering ({name}) failed mid-reply; the turn was not kept, send it again"
                    yield f"data: {json.dumps(error_body(message, type='server_error', code='replica_failed'))}\n\n"
            finally:
                if not finished:
                    parts.cancel()  # the client went away: the replica cancels the generation
                self._release(name)
                if on_end is not None:
                    on_end()

        return StreamingResponse(stream(), status_code=head.status, headers=headers)

    async def _collect(self, name: str, request: Forwarded, adopt: str | None = None) -> Head:
        """The whole answer of replica `name` (for the small JSON of the session and memory routes)."""
        head, parts = await self._open(name, request, adopt)
        try:
            head.body += b"".join([chunk async for chunk in parts])
        finally:
            self._release(name)
        return head

    async def _each(self, request: Forwarded) -> dict[str, Head]:
        """`request` sent to every replica that is up; the answers of those that gave one."""
        names = [n for n in self.handles if n not in self.down]
        answers = await asyncio.gather(*(self._collect(n, request) for n in names), return_exceptions=True)
        return {name: head for name, head in zip(names, answers) if isinstance(head, Head)}

    async def _reports(self, exclude: set[str] | tuple = ()) -> list[Report]:
        """The load of every replica that is up and not excluded (one that does not answer in time is marked down)."""
        names = [n for n in self.handles if n not in self.down and n not in exclude]

        async def one(name: str) -> Report | None:
            call = self.handles[name].report.remote()
            try:
                return await asyncio.wait_for(_awaited(call), timeout=self.config.probe_timeout_s)
            except (asyncio.TimeoutError, ray.exceptions.RayError) as error:
                call.cancel()
                self._mark_down(name, error)
                return None

        return [r for r in await asyncio.gather(*(one(n) for n in names)) if r is not None]

    async def _ping(self, name: str) -> bool:
        call = self.handles[name].ping.remote()
        try:
            identity = await asyncio.wait_for(_awaited(call), timeout=self.config.probe_timeout_s)
        except (asyncio.TimeoutError, ray.exceptions.RayError) as error:
            call.cancel()
            self._mark_down(name, error)
            return False
        previous = self.identity.get(name)
        if previous is not None and previous.get("actor") != identity.get("actor"):
            logger.warning("replica %s restarted (%s → %s): its sessions restore from the store on their next turn",
                           name, previous.get("actor"), identity.get("actor"))
        self.identity[name] = identity
        if self.down.pop(name, None) is not None:
            logger.warning("replica %s answers again", name)
        self.metrics.up.labels(name).set(1)
        return True

    def _mark_down(self, name: str, error: BaseException) -> None:
        if name not in self.down:
            logger.warning("replica %s is down (%s): its sessions move to the other replicas", name,
                           type(error).__name__)
            self.down[name] = time.monotonic()
        self.metrics.up.labels(name).set(0)

    async def _watch(self) -> None:
        """Ping every replica every probe interval: a dead one is marked down before a request waits on it, and one
        that answers again (Serve restarted it) takes new sessions."""
        while True:
            await asyncio.gather(*(self._ping(n) for n in self.handles), return_exceptions=True)
            await asyncio.sleep(self.config.probe_interval_s)

    def _fire(self, call: Any) -> None:
        """A control call whose answer nobody waits for (its failure is logged, not raised)."""
        async def run() -> None:
            try:
                await _awaited(call)
            except Exception as error:  # noqa: BLE001
                logger.warning("a control call failed: %s", error)

        asyncio.ensure_future(run())


def _retrieved(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


async def _awaited(response: Any) -> Any:
    return await response


def _json(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def _message(body: bytes) -> str:
    """The message of an OpenAI error body."""
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200]


def _first_error(answers: dict[str, Head]) -> tuple[str, Head] | None:
    """A replica's refusal (401 without the API key, ...) is the cluster's answer too."""
    return next(((name, head) for name, head in answers.items() if head.status != 200), None)
