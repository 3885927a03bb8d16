"""The cluster's plain-Python pieces: affinity keys, the session table, placement by free KV, the refusal's numbers,
the merged memory / session / metrics views, and the `serve run` arguments."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.cluster.conftest import NEEDS_SERVE

pytest.importorskip("fastapi", reason=NEEDS_SERVE)

from prometheus_client import CollectorRegistry, Counter as PromCounter  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kvbound.cluster import aggregate  # noqa: E402
from kvbound.cluster.config import ClusterConfig  # noqa: E402
from kvbound.cluster.routing import (Report, SessionTable, affinity_key, cluster_full_message,  # noqa: E402
                                     explicit_id, place, rank)
from kvbound.server.settings import ServerSettings  # noqa: E402


def report(name: str, available: int, blocks: int = 16, idle: int = 0, sessions: int = 0, droppable: int = 0,
           max_sessions: int = 8, queued: int = 0) -> Report:
    return Report(name, blocks=blocks, free_blocks=available, available_blocks=available,
                  reclaimable_blocks=available + idle, block_tokens=32, block_bytes=16384, sessions=sessions,
                  droppable_sessions=droppable, max_sessions=max_sessions, active=0, queued=queued, max_queued=64)


def test_a_conversation_keeps_its_key_as_it_grows() -> None:
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    later = first + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    key = affinity_key({"messages": first})
    assert key.startswith("history:") and key == affinity_key({"messages": later}) == affinity_key({"messages": parts})
    assert key != affinity_key({"messages": [{"role": "user", "content": "hi"}]})  # another system prompt
    assert affinity_key({"messages": later, "session_id": "ann"}) == "session:ann"
    assert explicit_id("session:ann") == "ann" and explicit_id(key) is None
    # not a chat request: no key (any replica answers it, with its 400)
    for body in (None, [], {"messages": []}, {"messages": ["x"]}, {"messages": "hi"}, {"session_id": "bad id!"}):
        assert affinity_key(body) is None


def test_the_table_forgets_the_least_recently_used_past_its_limit() -> None:
    table = SessionTable(limit=2)
    table.assign("a", "replica-0")
    table.assign("b", "replica-1")
    assert table.owner("a") == "replica-0"  # a is now the most recent
    table.assign("c", "replica-1")
    assert table.owner("b") is None and table.owner("a") == "replica-0" and len(table) == 2
    assert table.counts() == Counter({"replica-0": 1, "replica-1": 1})
    table.forget("a")
    assert table.owner("a") is None


def test_a_new_session_goes_to_the_replica_with_the_most_free_kv() -> None:
    reports = [report("replica-0", 10), report("replica-1", 12), report("replica-2", 3)]
    assert place(reports).replica == "replica-1"
    # a tie: the replica this ingress sent fewer sessions to, then fewer sessions, then the name
    tied = [report("replica-0", 8, sessions=1), report("replica-1", 8, sessions=3)]
    assert place(tied).replica == "replica-0"
    assert place(tied, Counter({"replica-0": 5})).replica == "replica-1"
    assert [r.replica for r in rank(reports)] == ["replica-1", "replica-0", "replica-2"]


def test_a_replica_whose_idle_sessions_hold_its_kv_still_takes_sessions() -> None:
    busy = report("replica-0", 0, idle=0)  # every block held by turns in progress
    idle = report("replica-1", 0, idle=16)  # every block held by idle sessions: they are offloaded for a new one
    assert busy.refusal() == "every KV block is held by turns in progress" and idle.refusal() is None
    assert place([busy, idle]).replica == "replica-1"
    assert [r.replica for r in rank([busy, idle])] == ["replica-1", "replica-0"]


def test_when_every_replica_is_full_the_refusal_has_each_ones_numbers() -> None:
    reports = [report("replica-0", 0), report("replica-1", 5, sessions=8, max_sessions=8),
               report("replica-2", 5, queued=64)]
    assert place(reports) is None
    message = cluster_full_message(reports, down=["replica-3"])
    assert message.startswith("all 4 replicas are full")
    assert "replica-0: 0 of 16 KV blocks free for new work (0 tokens, 0 B of 256.0 KiB)" in message
    assert "every KV block is held by turns in progress" in message
    assert "8/8 sessions" in message and "it holds 8 sessions, its limit" in message
    assert "64 requests wait for its engine" in message and "replica-3: not answering" in message
    # the session limit counts only sessions that cannot be dropped: one found by history makes room
    assert report("replica-1", 5, sessions=8, droppable=1).refusal() is None


def _memory(sessions: list[str], used: int) -> dict:
    return {"process": {"weights_bytes": 100, "rss_bytes": 1000, "kv_reserved_bytes": 512},
            "pool": {"dtype": "fp32", "block_tokens": 32, "block_bytes": 16, "blocks": 32, "free_blocks": 32 - used,
                     "used_blocks": used, "budget_bytes": 512, "used_bytes": used * 16},
            "engine": {"active": 0, "queued": 0, "steps": 3, "offloads": 1},
            "sessions": [{"id": s, "kv_bytes": 16} for s in sessions]}


def test_the_cluster_memory_document_sums_the_replicas_and_labels_theirs() -> None:
    merged = aggregate.merge_memory({"replica-0": _memory(["a", "b"], 2), "replica-1": _memory(["c"], 1)},
                                    down=["replica-2"])
    assert merged["cluster"] == {"replicas": 3, "up": 2}
    assert merged["pool"]["budget_bytes"] == 1024 and merged["pool"]["used_blocks"] == 3
    assert merged["pool"]["block_bytes"] == 16 and merged["pool"]["dtype"] == "fp32"  # the same everywhere
    assert merged["process"]["weights_bytes"] == 200 and merged["engine"]["offloads"] == 2
    assert [(s["id"], s["replica"]) for s in merged["sessions"]] == [("a", "replica-0"), ("b", "replica-0"),
                                                                     ("c", "replica-1")]
    assert [(r["replica"], r["up"]) for r in merged["replicas"]] == [("replica-0", True), ("replica-1", True),
                                                                     ("replica-2", False)]
    assert merged["replicas"][0]["pool"]["used_blocks"] == 2 and merged["replicas"][0]["sessions"] == 2


def test_a_session_is_listed_once() -> None:
    listings = {"replica-0": [{"id": "a", "state": "idle"}, {"id": "s", "state": "stored"},
                              {"id": "t", "state": "stored"}],
                "replica-1": [{"id": "a", "state": "offloaded"}, {"id": "s", "state": "idle"},
                              {"id": "t", "state": "stored"}]}
    owners = {"a": "replica-1"}
    data = aggregate.merge_sessions(listings, owners.get)
    assert {d["id"]: (d["state"], d.get("replica")) for d in data} == {
        "a": ("offloaded", "replica-1"), "s": ("idle", "replica-1"), "t": ("stored", None)}
    assert len(data) == 3


def test_every_replica_metric_gets_a_replica_label() -> None:
    def exposition(count: int) -> str:
        registry = CollectorRegistry()
        PromCounter("kvbound_requests", "HTTP requests", ["route", "status"], registry=registry).labels(
            "/v1/models", "200").inc(count)
        from prometheus_client import generate_latest

        return generate_latest(registry).decode()

    own = CollectorRegistry()
    PromCounter("kvbound_cluster_refused", "refused", registry=own).inc()
    text = aggregate.merge_metrics({"replica-0": exposition(2), "replica-1": exposition(5)}, own).decode()
    samples = {(s.name, s.labels.get("replica")): s.value for f in text_string_to_metric_families(text)
               for s in f.samples}
    assert samples[("kvbound_requests_total", "replica-0")] == 2
    assert samples[("kvbound_requests_total", "replica-1")] == 5
    assert samples[("kvbound_cluster_refused_total", None)] == 1
    assert text.count("# TYPE kvbound_requests_total counter") == 1  # one family, both replicas' samples


def test_serve_run_arguments(tmp_path: Path) -> None:
    config = ClusterConfig.from_args({"replicas": "3", "data_dir": str(tmp_path), "kv_budget": "64MiB",
                                      "max_sessions": "16", "policy": "window", "device": "cpu",
                                      "replica_cpus": "0.5", "model": "smollm2-135m"})
    assert config.replicas == 3 and config.replica_cpus == 0.5 and config.model == "smollm2-135m"
    assert config.settings == ServerSettings(kv_budget="64MiB", max_sessions=16, policy="window", data_dir=tmp_path)
    assert config.load_options == {"device": "cpu"} and config.replica_gpus == 0
    assert ClusterConfig.from_args({"data_dir": str(tmp_path), "device": "cuda:1"}).replica_gpus == 1
    assert config.replica_names == ["replica-0", "replica-1", "replica-2"]
    assert ClusterConfig.from_args({"data_dir": str(tmp_path), "kv_budget": "1048576"}).settings.kv_budget == 1 << 20
    pinned = ClusterConfig.from_args({"data_dir": str(tmp_path), "replica_resources": '{"kvbound_store": 1}'})
    assert pinned.replica_resources == {"kvbound_store": 1}
    assert ClusterConfig.from_args({"data_dir": str(tmp_path), "replica_resources": {"x": 0.5}}).replica_resources == {
        "x": 0.5}
    with pytest.raises(ValueError, match="unknown argument.*colour"):
        ClusterConfig.from_args({"data_dir": str(tmp_path), "colour": "red"})
    with pytest.raises(ValueError, match="a cluster needs --data-dir"):
        ClusterConfig.from_args({"replicas": "2"})
    with pytest.raises(ValueError, match="--replicas must be an integer >= 1"):
        ClusterConfig(ServerSettings(data_dir=tmp_path), replicas=0)
