"""The cluster on a real local Ray (127.0.0.1, 2 CPUs): 2 kvbound replicas of the tiny model behind Serve's HTTP
proxy and the ingress. Affinity over many turns, the merged memory views within each replica's budget, and a
replica's actor killed with ray.kill: its sessions continue on the other replica with their history intact."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.cluster.conftest import NEEDS_RAY, NEEDS_SERVE, converse, turn

pytest.importorskip("fastapi", reason=NEEDS_SERVE)
pytest.importorskip("ray.serve", reason=NEEDS_RAY)


def test_affinity_holds_over_many_turns(ray_cluster) -> None:
    replicas = converse(ray_cluster.client, rounds=5, named=("ray-a", "ray-b", "ray-c"), found=("h0", "h1"))
    assert all(len(names) == 1 for names in replicas.values()), replicas
    assert set().union(*replicas.values()) == {"replica-0", "replica-1"}


def test_budgets_hold_and_the_views_label_each_replica(ray_cluster) -> None:
    client = ray_cluster.client
    assert turn(client, "hello", session_id="ray-views").status_code == 200
    memory = client.get("/v1/memory").json()
    budget = 1024 * 512  # kv_tokens=1024 of the tiny model's 512 bytes per token (fp32, 2 layers × 2 KV heads × 16)
    assert memory["cluster"] == {"replicas": 2, "up": 2}
    assert [r["pool"]["budget_bytes"] for r in memory["replicas"]] == [budget, budget]
    assert memory["pool"]["budget_bytes"] == 2 * budget
    for r in memory["replicas"]:
        held = sum(s["kv_bytes"] for s in memory["sessions"] if s["replica"] == r["replica"])
        assert held == r["pool"]["used_bytes"] <= r["pool"]["budget_bytes"]
    metrics = client.get("/metrics").text
    for name in ("replica-0", "replica-1"):
        assert f'kvbound_kv_budget_bytes{{replica="{name}"}} {float(budget)}' in metrics
        assert f'kvbound_requests_total{{replica="{name}",route="/v1/chat/completions",status="200"}}' in metrics
    assert "kvbound_cluster_route_seconds_count" in metrics


def test_a_killed_replicas_sessions_continue_elsewhere(ray_cluster) -> None:
    import ray

    client = ray_cluster.client
    history: list = []
    for text in ("one", "two", "three"):  # a named session, and one found by history (placed where KV is free)
        named = turn(client, text, session_id="ray-kill")
        assert named.status_code == 200
        home = named.headers["x-kvbound-replica"]
        r = turn(client, text, history=[{"role": "system", "content": "kill"}] + history)
        found_home = r.headers["x-kvbound-replica"]
        history += [{"role": "user", "content": text},
                    {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]}]
    before = client.get("/v1/sessions/ray-kill").json()
    identity = ray_cluster.handle(home).ping.remote().result()
    actor = identity["actor"]

    ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=False)
    started = time.monotonic()
    while psutil.pid_exists(identity["pid"]) and time.monotonic() < started + 10:  # ray.kill returns before the end
        time.sleep(0.05)
    after = turn(client, "four", session_id="ray-kill")
    assert after.status_code == 200, after.text
    assert after.headers["x-kvbound-replica"] != home
    assert after.headers["x-kvbound-session-state"] == "restored"
    assert after.json()["kvbound"]["refed_history_tokens"] == 0  # the store's snapshot: no prefill
    assert after.json()["kvbound"]["reused_tokens"] == before["kv_tokens"]
    failover_s = time.monotonic() - started
    session = client.get("/v1/sessions/ray-kill").json()
    assert session["messages"][:len(before["messages"])] == before["messages"]  # no answered turn lost
    assert session["turns"] == 4 and session["messages"][-2] == {"role": "user", "content": "four"}

    found = turn(client, "four", history=[{"role": "system", "content": "kill"}] + history)
    assert found.status_code == 200 and found.headers["x-kvbound-replica"] != home
    if found_home == home:  # it lived on the killed replica: rebuilt elsewhere from the history the client sent
        assert found.json()["kvbound"]["refed_history_tokens"] > 0
    else:  # it lived on the other one: untouched
        assert found.headers["x-kvbound-session-state"] == "reused"

    assert failover_s < 10  # the ingress noticed the death (pings) and restored the session: 0.8 s here
    deadline = time.monotonic() + 60  # Serve restarts the killed replica; the ingress takes it back
    while client.get("/health").json()["status"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.5)
    health = client.get("/health").json()
    assert health["status"] == "ok", health
    assert {r["replica"]: r["actor"] for r in health["replicas"]}[home] != actor  # a new actor
