"""The cluster's views built from each replica's own: the memory document (/v1/memory and the dashboard's data),
the session listing and the Prometheus exposition, each replica's part labelled with its name. Pure functions of
what the replicas answered; nothing here calls a replica."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

SAME_IN_EVERY_REPLICA = ("dtype", "block_tokens", "block_bytes")  # one model and KV config: not summed


def _summed(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers added up across replicas (an upper bound for peaks); strings and the per-block figures kept."""
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key in SAME_IN_EVERY_REPLICA or not isinstance(value, (int, float)) or isinstance(value, bool):
                total.setdefault(key, value)
            else:
                total[key] = total.get(key, 0) + value
    return total


def merge_memory(documents: dict[str, dict[str, Any]], down: Iterable[str] = ()) -> dict[str, Any]:
    """One memory document for the cluster, in the shape of a single server's (kvbound.server.memory) so a client
    of /v1/memory reads it the same way: `process`, `pool` and `engine` are sums over the replicas that answered,
    `sessions` all of theirs, each with its `replica`. Added: `replicas` (each replica's own process/pool/engine,
    and `up`) and `cluster` (replicas, up)."""
    names = list(documents)
    replicas = [{"replica": name, "up": True, "process": doc["process"], "pool": doc["pool"], "engine": doc["engine"],
                 "sessions": len(doc["sessions"])} for name, doc in documents.items()]
    replicas += [{"replica": name, "up": False} for name in sorted(down)]
    return {"cluster": {"replicas": len(replicas), "up": len(names)},
            "process": _summed([d["process"] for d in documents.values()]),
            "pool": _summed([d["pool"] for d in documents.values()]),
            "engine": _summed([d["engine"] for d in documents.values()]),
            "sessions": [{**s, "replica": name} for name, doc in documents.items() for s in doc["sessions"]],
            "replicas": replicas}


def merge_dashboard(data: dict[str, dict[str, Any]], down: Iterable[str] = ()) -> dict[str, Any]:
    """GET /dashboard/data for the cluster (kvbound.server.dashboard.dashboard_data of every replica): the merged
    memory document, totals added up, memory events of all replicas in time order (each with its `replica`)."""
    first = next(iter(data.values()), {})
    totals = {"generated_tokens": 0, "evicted_tokens": 0, "memory_events": {}}
    for part in data.values():
        totals["generated_tokens"] += part["totals"]["generated_tokens"]
        totals["evicted_tokens"] += part["totals"]["evicted_tokens"]
        for level, count in part["totals"]["memory_events"].items():
            totals["memory_events"][level] = totals["memory_events"].get(level, 0) + count
    events = sorted(({**e, "replica": name} for name, part in data.items() for e in part["events"]),
                    key=lambda e: e["time"])
    return {"time": max((p["time"] for p in data.values()), default=0), "model": first.get("model"),
            "memory": merge_memory({name: part["memory"] for name, part in data.items()}, down),
            "totals": totals, "events": events}


def merge_sessions(listings: dict[str, list[dict[str, Any]]], owner: Callable[[str], str | None]) -> list[dict]:
    """GET /v1/sessions for the cluster. A session loaded on a replica is listed once, with its `replica` (the one
    the ingress routes it to, if two hold a copy); one only in the shared store ("stored") once, without one."""
    loaded: dict[str, dict[str, Any]] = {}
    stored: dict[str, dict[str, Any]] = {}
    for name, entries in listings.items():
        for entry in entries:
            if entry.get("state") == "stored":
                stored.setdefault(entry["id"], entry)
                continue
            current = loaded.get(entry["id"])
            if current is None or owner(entry["id"]) == name:
                loaded[entry["id"]] = {**entry, "replica": name}
    return list(loaded.values()) + [entry for key, entry in stored.items() if key not in loaded]


class _Relabelled:
    """A collector of every replica's metric families, each sample labelled with its replica."""

    def __init__(self, expositions: dict[str, str]):
        self.expositions = expositions

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for name, text in self.expositions.items():
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.add_sample(sample.name, {"replica": name, **sample.labels}, sample.value, sample.timestamp)
        yield from families.values()


def merge_metrics(expositions: dict[str, str], own: CollectorRegistry | None = None) -> bytes:
    """The Prometheus text of every replica's /metrics with a `replica` label, then the ingress's own metrics."""
    registry = CollectorRegistry()
    registry.register(_Relabelled(expositions))
    return generate_latest(registry) + (generate_latest(own) if own is not None else b"")
