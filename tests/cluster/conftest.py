"""Fixtures of the cluster tests. Two ways to run the cluster's pieces on the tiny random-weight model:

* in process (`local_cluster`): real kvbound replicas (KvboundReplica: model, pool, worker, shared SQLite store)
  and the real Ingress, joined by stand-ins for Ray Serve's DeploymentHandles — routing, failover and the merged
  views checked deterministically in seconds (a replica can be made to hang like a dead one, or to refuse as full);
* on Ray (`ray_cluster`): a local Ray on 127.0.0.1 (2 CPUs) running the Serve application of 2 replicas behind its
  HTTP proxy, as `kvbound serve --ray` runs it — affinity, a replica's actor killed, the memory views.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

import pytest

if TYPE_CHECKING:
    from kvbound.cluster.config import ClusterConfig
    from kvbound.cluster.forward import Head

# The tiny vocabulary's special tokens banned: every reply runs to exactly max_tokens (as in tests/server).
NO_STOP = {"0": -100, "1": -100, "2": -100}
# Each test module skips itself, with these reasons, when an extra it needs is missing (this conftest imports
# neither, so `pytest tests/cluster` and `pytest` both report the skip).
NEEDS_SERVE = "the cluster tests need the serve extra: pip install -e '.[serve,test]'"
NEEDS_RAY = "the cluster tests need Ray Serve: pip install -e '.[ray]'"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers_tiny import save_hf_dir, tiny_case_model

    return save_hf_dir(tiny_case_model("llama"), tmp_path_factory.mktemp("cluster-model") / "tiny")


def cluster_config(model: Path, data_dir: Path, replicas: int = 2, **settings: Any) -> "ClusterConfig":
    from kvbound.cluster.config import ClusterConfig
    from kvbound.server.settings import ServerSettings

    settings = {"kv_tokens": 1024, "max_sessions": 8, **settings}
    return ClusterConfig(ServerSettings(data_dir=data_dir, **settings), replicas=replicas, model=str(model),
                         load_options={"device": "cpu"}, replica_cpus=0.5, probe_interval_s=0.2,
                         probe_timeout_s=0.5)


def turn(client: Any, text: str, session_id: str | None = None, history: list | None = None,
         max_tokens: int = 4) -> Any:
    """One chat turn: by session id (only the new message) or with the whole history."""
    body = {"model": "tiny", "messages": [*(history or []), {"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": 0, "logit_bias": NO_STOP}
    if session_id is not None:
        body["session_id"] = session_id
    return client.post("/v1/chat/completions", json=body)


def converse(client: Any, rounds: int, named: tuple[str, ...], found: tuple[str, ...]) -> dict[str, set[str]]:
    """Round after round, a turn of each named session (its id and the new message) and of each session found by
    history (the whole history, a system prompt of its name): every answer 200, its session `new` in the first round
    and `reused` (its KV kept on its replica) after. Returns the replicas that answered each session."""
    replicas: dict[str, set[str]] = {}
    histories: dict[str, list] = {name: [] for name in found}
    for round_ in range(rounds):
        for sid in named:
            r = turn(client, f"{sid} {round_}", session_id=sid)
            assert r.status_code == 200, r.text
            assert r.headers["x-kvbound-session-state"] == ("new" if round_ == 0 else "reused"), (sid, round_)
            replicas.setdefault(sid, set()).add(r.headers["x-kvbound-replica"])
        for name, history in histories.items():
            r = turn(client, f"{name} {round_}", history=[{"role": "system", "content": name}] + history)
            assert r.status_code == 200, r.text
            assert r.headers["x-kvbound-session-state"] == ("new" if round_ == 0 else "reused"), (name, round_)
            replicas.setdefault(name, set()).add(r.headers["x-kvbound-replica"])
            history += [{"role": "user", "content": f"{name} {round_}"},
                        {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]}]
    return replicas


# -- in process ---------------------------------------------------------------------------------------------------
class _Call:
    """What `handle.method.remote()` gives: awaitable once, cancellable."""

    def __init__(self, awaitable: Any):
        self.task = asyncio.ensure_future(awaitable)

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.task.cancel()


class _Parts:
    """What `handle.options(stream=True).forward.remote()` gives: an async iterator, cancellable."""

    def __init__(self, parts: AsyncIterator[Any]):
        self.parts = parts

    def __aiter__(self) -> "_Parts":
        return self

    async def __anext__(self) -> Any:
        return await self.parts.__anext__()

    def cancel(self) -> None:
        async def close() -> None:
            try:
                await self.parts.aclose()
            except RuntimeError:  # still running: the cancelled __anext__ closes it
                pass

        asyncio.ensure_future(close())


async def _forever() -> None:
    await asyncio.Event().wait()


async def _hang() -> AsyncIterator[Any]:
    await _forever()
    yield None


class _Method:
    def __init__(self, handle: "LocalHandle", name: str):
        self.handle, self.name = handle, name

    def remote(self, *args: Any) -> Any:
        if self.handle.dead:  # Serve queues calls to a deployment with no live replica: they never answer
            return _Parts(_hang()) if self.name == "forward" else _Call(_forever())
        if self.name == "forward":
            if self.handle.full and args[0].path == "/v1/chat/completions":
                return _Parts(_refusal())
            return _Parts(self.handle.replica.forward(*args))
        return _Call(getattr(self.handle.replica, self.name)(*args))


async def _refusal() -> AsyncIterator["Head"]:
    import httpx

    from kvbound.cluster.forward import Head
    from kvbound.server.protocol import error_body

    body = httpx.Response(429, json=error_body("the shared KV pool has 0 blocks free", "server_busy",
                                               code="server_busy")).content
    yield Head(429, [("content-type", "application/json")], body)


class LocalHandle:
    """A DeploymentHandle stand-in on an in-process replica; `dead` makes it hang, `full` refuse chat turns."""

    def __init__(self, replica: Any):
        self.replica, self.dead, self.full = replica, False, False

    def options(self, **_: Any) -> "LocalHandle":
        return self

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


class LocalCluster:
    """Ingress + replicas in this process on one event loop (`run`), and an httpx client on the Ingress (`client`)."""

    def __init__(self, config: "ClusterConfig"):
        from kvbound.cluster.ingress import Ingress
        from kvbound.cluster.replica import KvboundReplica

        self.config = config
        self.runner = asyncio.Runner()
        self.replicas = [KvboundReplica(name, config) for name in config.replica_names]
        self.handles = dict(zip(config.replica_names, (LocalHandle(r) for r in self.replicas)))
        self.ingress = Ingress(list(self.handles.values()), config)

    async def _asgi(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.requests import Request

        response = await self.ingress(Request(scope, receive))
        await response(scope, receive, send)

    def request(self, method: str, path: str, **options: Any) -> Any:
        import httpx

        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self._asgi)
            async with httpx.AsyncClient(transport=transport, base_url="http://cluster", timeout=30) as client:
                return await client.request(method, path, **options)

        return self.runner.run(go())

    def close(self) -> None:
        async def stop() -> None:
            monitor = self.ingress._monitor
            if monitor is not None:
                monitor.cancel()
            for replica in self.replicas:
                await replica.close()

        self.runner.run(stop())
        self.runner.close()


class _Client:
    """The few httpx.Client methods the tests use, on a LocalCluster."""

    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster

    def get(self, path: str, **options: Any) -> Any:
        return self.cluster.request("GET", path, **options)

    def post(self, path: str, **options: Any) -> Any:
        return self.cluster.request("POST", path, **options)

    def delete(self, path: str, **options: Any) -> Any:
        return self.cluster.request("DELETE", path, **options)


@pytest.fixture
def local_cluster(tiny_dir: Path, tmp_path: Path) -> Iterator[Any]:
    """A function: `local_cluster(**settings)` → (LocalCluster, client); replicas share tmp_path/data."""
    made: list[LocalCluster] = []

    def make(**settings: Any) -> tuple[LocalCluster, _Client]:
        cluster = LocalCluster(cluster_config(tiny_dir, tmp_path / "data", **settings))
        made.append(cluster)
        return cluster, _Client(cluster)

    yield make
    for cluster in made:
        cluster.close()


# -- on Ray -------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    def __init__(self, url: str, config: "ClusterConfig"):
        import httpx

        self.url, self.config = url, config
        self.client = httpx.Client(base_url=url, timeout=60)

    def handle(self, name: str) -> Any:
        from ray import serve

        return serve.get_deployment_handle(name, app_name=self.config.name)


@pytest.fixture(scope="module")
def ray_cluster(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """Local Ray (127.0.0.1, 2 CPUs) running 2 kvbound replicas (0.5 CPU each) and the ingress behind Serve's proxy."""
    import ray
    from ray import serve

    from kvbound.cluster.app import build_app

    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        config = cluster_config(tiny_dir, tmp_path_factory.mktemp("cluster-data"))
        serve.run(build_app(config), name=config.name, route_prefix="/")
        cluster = RayCluster(f"http://127.0.0.1:{port}", config)
        yield cluster
        cluster.client.close()
    finally:
        serve.shutdown()
        ray.shutdown()
