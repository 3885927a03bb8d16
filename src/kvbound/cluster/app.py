"""The Ray Serve application: one `replica-<i>` deployment per kvbound replica (one Serve replica each, so every
kvbound replica has a name the ingress routes to and labels its metrics with) and the `ingress` deployment in front,
holding a DeploymentHandle to each. `build(args)` is the application builder `serve run` and Serve config files
name: `serve run kvbound.cluster.app:build replicas=2 data_dir=/shared/kvbound kv_budget=256MiB`."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from kvbound.cluster.config import ClusterConfig
from kvbound.cluster.ingress import Ingress
from kvbound.cluster.replica import KvboundReplica

INGRESS_MAX_ONGOING = 4096  # the ingress only waits on replicas; each replica bounds its own work (429 past it)


def build_app(config: ClusterConfig) -> Application:
    replica = serve.deployment(KvboundReplica)
    handles = [replica.options(name=name, num_replicas=1, max_ongoing_requests=config.max_ongoing_requests,
                               ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus,
                                                  "resources": dict(config.replica_resources)},
                               logging_config={"enable_access_log": False}).bind(name, config)
               for name in config.replica_names]
    ingress = serve.deployment(Ingress).options(name="ingress", num_replicas=1,
                                                max_ongoing_requests=INGRESS_MAX_ONGOING,
                                                ray_actor_options={"num_cpus": 0})
    return ingress.bind(handles, config)


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder: `args` are ClusterConfig.from_args' keys (strings from the command line)."""
    return build_app(ClusterConfig.from_args(args))
