"""What a kvbound cluster is made of: how many replicas, the model each loads, the server settings each runs with
(its own KV budget; the --data-dir every replica shares), the Ray resources of a replica and how the ingress
watches them. One frozen dataclass, checked when built; `from_args` reads the string arguments of `serve run`."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbound.server.settings import ServerSettings

APP_NAME = "kvbound"
LOAD_OPTIONS = ("dtype", "device", "weights", "memory_budget")  # kvbound.load's keywords a replica passes on
# Calls a replica takes at once beyond its generations: pings, reports, memory reads. Serve queues past
# max_ongoing_requests, and a ping stuck in that queue would read as a dead replica.
CONTROL_HEADROOM = 32


def replica_name(index: int) -> str:
    """The Serve deployment of replica `index` and the `replica` label of its metrics."""
    return f"replica-{index}"


@dataclass(frozen=True)
class ClusterConfig:
    settings: ServerSettings  # every replica's: its own pool of this budget; data_dir shared by all
    replicas: int = 2
    model: str | None = None  # a .gguf path, a safetensors directory or a known name, readable on every node
    load_options: dict[str, Any] = field(default_factory=dict)  # dtype, device, weights, memory_budget
    replica_cpus: float = 1.0  # Ray resources one replica reserves
    replica_gpus: float = 0.0
    replica_resources: dict[str, float] = field(default_factory=dict)  # custom ones: {"kvbound_store": 1} keeps
    # every replica on the node started with `ray start --resources '{"kvbound_store": N}'` (where --data-dir is)
    probe_interval_s: float = 1.0  # how often the ingress pings each replica, and how long a request waits on a
    probe_timeout_s: float = 2.0  # replica before pinging it; a ping unanswered this long marks it down
    name: str = APP_NAME

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"--replicas must be an integer >= 1, got {self.replicas!r}")
        if self.settings.data_dir is None:
            raise ValueError("a cluster needs --data-dir: replicas keep named sessions in its SQLite store and restore "
                             "a session from it when its replica is gone; give a directory every replica can reach")
        unknown = set(self.load_options) - set(LOAD_OPTIONS)
        if unknown:
            raise ValueError(f"unknown load option(s) {', '.join(sorted(unknown))}; known: {', '.join(LOAD_OPTIONS)}")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError("replica_cpus and replica_gpus must be >= 0")
        if self.probe_interval_s <= 0 or self.probe_timeout_s <= 0:
            raise ValueError("probe_interval_s and probe_timeout_s must be > 0")

    @property
    def replica_names(self) -> list[str]:
        return [replica_name(i) for i in range(self.replicas)]

    @property
    def max_ongoing_requests(self) -> int:
        """What Serve lets one replica take at once: its own queue (kvbound answers 429 past it) and headroom."""
        return self.settings.max_active + self.settings.max_queued + CONTROL_HEADROOM

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ClusterConfig":
        """From `serve run kvbound.cluster.app:build key=value ...` or a Serve config file's `args`: the keys are
        this class's fields, kvbound.load's options and ServerSettings' fields (kv_budget, policy, data_dir, ...);
        values may be strings. The API key may come from the environment (KVBOUND_API_KEY)."""
        args = dict(args)
        cluster_fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("settings", "load_options")}
        settings_fields = {f.name: f for f in dataclasses.fields(ServerSettings)}
        unknown = set(args) - set(cluster_fields) - set(settings_fields) - set(LOAD_OPTIONS)
        if unknown:
            raise ValueError(f"unknown argument(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(sorted([*cluster_fields, *settings_fields, *LOAD_OPTIONS]))}")
        settings = {k: _typed(settings_fields[k].type, v) for k, v in args.items() if k in settings_fields}
        if "api_key" not in settings and os.environ.get("KVBOUND_API_KEY"):
            settings["api_key"] = os.environ["KVBOUND_API_KEY"]
        own = {k: _typed(cluster_fields[k].type, v) for k, v in args.items() if k in cluster_fields}
        load = {k: v for k, v in args.items() if k in LOAD_OPTIONS}
        own.setdefault("replica_gpus", gpus_for(load.get("device")))
        return cls(ServerSettings(**settings), load_options=load, **own)


def gpus_for(device: str | None) -> float:
    """A replica's GPUs when none are given: one on a CUDA device; none else (Ray then hides the GPUs from it)."""
    return 1.0 if str(device or "").startswith("cuda") else 0.0


def _typed(annotation: Any, value: Any) -> Any:
    """A `key=value` string as the field's type (annotations are strings here: 'int | None', 'Path | None')."""
    if not isinstance(value, str):
        return Path(value) if "Path" in str(annotation) and value is not None else value
    kind = str(annotation)
    if kind.startswith("dict"):  # replica_resources='{"kvbound_store": 1}'
        return json.loads(value)
    if kind.startswith("int | str"):  # kv_budget: bytes or '64MiB'
        return int(value) if value.isdigit() else value
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    if "Path" in kind:
        return Path(value)
    return value
