"""`kvbound serve --ray`: start (or join, with --address) a Ray cluster, run the kvbound Serve application on it and
serve until Ctrl-C. The command's flags arrive already checked (kvbound.cli.app builds the ServerSettings)."""

from __future__ import annotations

import signal
import time
from typing import Any

from rich.console import Console

from kvbound.cluster.config import ClusterConfig, gpus_for
from kvbound.errors import KvboundError
from kvbound.kvcache.spec import format_bytes, parse_size

DEFAULT_REPLICAS = 2


def serve_cluster(load: Any, settings: Any, *, replicas: int | None, address: str | None, host: str, port: int,
                  console: Console | None = None) -> None:
    """`load`: the command's ModelOptions (model, dtype, device, weights, memory_budget); `settings`: every
    replica's ServerSettings. A local Ray is shut down on exit; on a cluster that was joined only this app is."""
    if load.memory_budget is not None:
        parse_size(load.memory_budget)  # a typo fails here, not in every replica
    if port == 0:
        raise ValueError("kvbound serve --ray needs a fixed --port (Ray Serve's proxy does not pick a free one)")
    device = str(load.device)
    config = ClusterConfig(settings, replicas=replicas or DEFAULT_REPLICAS, model=load.model,
                           load_options={"dtype": load.dtype.value, "device": device, "weights": load.weights.value,
                                         "memory_budget": load.memory_budget},
                           replica_gpus=gpus_for(device))
    try:
        import ray
        from ray import serve
    except ImportError:
        raise KvboundError("kvbound serve --ray needs Ray Serve; install it with pip install 'kvbound[ray]'") \
            from None
    from kvbound.cluster.app import build_app

    console = console or Console(stderr=True, highlight=False)
    local = address is None  # "local": a new Ray of this machine's resources, even where RAY_ADDRESS is set
    ray.init(address=address or "local", logging_level="warning")
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or a supervisor's stop: shut down cleanly
        signal.signal(stop_signal, _interrupt)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(config), name=config.name, route_prefix="/")
        report = serve.get_deployment_handle(config.replica_names[0], app_name=config.name).report.remote().result()
        console.print(f"kvbound on Ray Serve: {config.replicas} replicas on http://{host}:{port} · KV pool "
                      f"{format_bytes(report.blocks * report.block_bytes)} ({report.blocks * report.block_tokens:,} "
                      f"tokens) per replica · sessions in {settings.data_dir} · Ctrl-C stops", markup=False)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(config.name)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
