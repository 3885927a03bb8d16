"""kvbound on Ray Serve (the `ray` extra): replicas of the single-process server, each with its own KV budget, behind
one ingress that keeps each session on the replica holding its cache, places new sessions by free KV, restores a
lost replica's sessions from the shared SessionStore elsewhere, and merges the replicas' memory views.

    config.py   ClusterConfig: replicas, model, per-replica ServerSettings, Ray resources
    routing.py  affinity keys, the session table, replica reports and placement (no Ray)
    forward.py  a request and its response as plain values; running one through an in-process ASGI app (no Ray)
    aggregate.py  /v1/memory, /metrics, /v1/sessions of the cluster from the replicas' (no Ray)
    replica.py  the Serve deployment around create_app;  ingress.py  the Serve deployment in front
    app.py      build_app(config) / build(args) for `serve run`;  launch.py  `kvbound serve --ray`
"""

from kvbound.cluster.config import ClusterConfig

__all__ = ["ClusterConfig"]
