"""The ingress and real kvbound replicas in one process (stand-in DeploymentHandles, see conftest): affinity across
turns, placement by free KV, a session moved off a full or dead replica with its history, the cluster-wide 429,
and the merged views. Deterministic, seconds; tests/cluster/test_ray.py runs the same pieces on Ray Serve."""

from __future__ import annotations

import json
import time

import pytest

from tests.cluster.conftest import NEEDS_RAY, NEEDS_SERVE, converse, turn

pytest.importorskip("fastapi", reason=NEEDS_SERVE)
pytest.importorskip("ray.serve", reason=NEEDS_RAY)


def test_a_session_stays_on_its_replica_across_turns(local_cluster) -> None:
    cluster, client = local_cluster()
    replicas = converse(client, rounds=4, named=("ann", "bob", "cid"), found=("h1", "h2"))
    assert all(len(names) == 1 for names in replicas.values()), replicas
    assert set().union(*replicas.values()) == {"replica-0", "replica-1"}  # placement by free KV used both


def test_placement_prefers_the_replica_with_more_free_kv(local_cluster) -> None:
    cluster, client = local_cluster()
    first = turn(client, "a long first message " * 6, session_id="big", max_tokens=40)
    assert first.status_code == 200
    second = turn(client, "short", session_id="small")
    assert second.headers["x-kvbound-replica"] != first.headers["x-kvbound-replica"]


def test_a_session_moves_off_a_full_replica_with_its_history(local_cluster) -> None:
    cluster, client = local_cluster()
    for text in ("one", "two"):
        home = turn(client, text, session_id="ann").headers["x-kvbound-replica"]
    cluster.handles[home].full = True  # its pool is held by other turns: it answers 429
    moved = turn(client, "three", session_id="ann")
    assert moved.status_code == 200, moved.text
    assert moved.headers["x-kvbound-replica"] != home
    assert moved.headers["x-kvbound-session-state"] == "restored"
    assert moved.json()["kvbound"]["refed_history_tokens"] == 0  # from the store's snapshot, no prefill
    session = client.get("/v1/sessions/ann").json()
    assert [m["content"] for m in session["messages"] if m["role"] == "user"] == ["one", "two", "three"]
    left = cluster.replicas[cluster.config.replica_names.index(home)]._local("ann")
    deadline = time.monotonic() + 10  # the ingress tells the old replica without waiting for it (fire and forget)
    while left.chat is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert left.chat is None  # the copy left behind gave its KV back to that replica's pool

    # back on its first replica (the other one now full): the stale copy there is brought up to date first
    cluster.handles[home].full = False
    cluster.handles[moved.headers["x-kvbound-replica"]].full = True
    back = turn(client, "four", session_id="ann")
    assert back.status_code == 200 and back.headers["x-kvbound-replica"] == home
    messages = client.get("/v1/sessions/ann").json()["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["one", "two", "three", "four"]


def test_a_refused_turn_with_nowhere_to_go_leaves_its_session_in_place(local_cluster) -> None:
    cluster, client = local_cluster(replicas=1)
    assert turn(client, "one", session_id="ann").status_code == 200
    cluster.handles["replica-0"].full = True
    refused = turn(client, "two", session_id="ann")
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    message = refused.json()["error"]["message"]
    assert message.startswith("the only replica is full — replica-0: ")
    assert "(the shared KV pool has 0 blocks free)" in message  # what the replica itself said
    cluster.handles["replica-0"].full = False
    again = turn(client, "two", session_id="ann")
    assert again.status_code == 200 and again.headers["x-kvbound-session-state"] == "reused"  # KV kept


def test_a_dead_replicas_sessions_are_restored_elsewhere(local_cluster) -> None:
    cluster, client = local_cluster()
    answers = [turn(client, text, session_id="ann") for text in ("one", "two")]
    home = answers[-1].headers["x-kvbound-replica"]
    cluster.handles[home].dead = True  # its calls never return, as Serve's queue for a replica that died
    after = turn(client, "three", session_id="ann")
    assert after.status_code == 200, after.text
    assert after.headers["x-kvbound-replica"] != home and after.headers["x-kvbound-session-state"] == "restored"
    assert after.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the snapshot's KV
    replies = [a.json()["choices"][0]["message"]["content"] for a in answers]
    session = client.get("/v1/sessions/ann").json()
    assert [m["content"] for m in session["messages"]] == ["one", replies[0], "two", replies[1], "three",
                                                           after.json()["choices"][0]["message"]["content"]]
    health = client.get("/health").json()
    assert health["status"] == "degraded" and {r["replica"]: r["up"] for r in health["replicas"]}[home] is False
    memory = client.get("/v1/memory").json()
    assert memory["cluster"] == {"replicas": 2, "up": 1}
    cluster.handles[home].dead = False  # Serve restarted it: a ping brings it back for new sessions
    cluster.runner.run(cluster.ingress._ping(home))
    assert client.get("/health").json()["status"] == "ok"


def test_all_full_is_a_429_with_every_replicas_numbers(local_cluster) -> None:
    cluster, client = local_cluster(max_sessions=2)
    created = [client.post("/v1/sessions", json={"session_id": f"s{i}"}) for i in range(4)]
    assert [c.status_code for c in created] == [201] * 4
    refused = client.post("/v1/sessions", json={"session_id": "s4"})
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    body = refused.json()
    assert body["error"]["code"] == "server_busy" and body["error"]["message"].startswith("all 2 replicas are full")
    assert "2/2 sessions" in body["error"]["message"] and "32 of 32 KV blocks free" in body["error"]["message"]
    assert [r["sessions"] for r in body["kvbound"]["replicas"]] == [2, 2]
    assert turn(client, "hi", session_id="s5").status_code == 429  # a chat that would make a new session too
    assert turn(client, "hi", session_id="s0").status_code == 200  # an existing one goes on
    assert client.delete("/v1/sessions/s1").status_code == 200
    assert client.post("/v1/sessions", json={"session_id": "s4"}).status_code == 201


def test_deleting_a_session_drops_it_everywhere(local_cluster) -> None:
    cluster, client = local_cluster()
    home = turn(client, "one", session_id="ann").headers["x-kvbound-replica"]
    cluster.handles[home].full = True
    assert turn(client, "two", session_id="ann").status_code == 200  # now on the other, a copy left on home
    cluster.handles[home].full = False
    assert client.delete("/v1/sessions/ann").status_code == 200
    assert client.get("/v1/sessions/ann").status_code == 404
    assert all(s.id != "ann" for r in cluster.replicas for s in r.server.registry.sessions())
    assert client.get("/v1/sessions").json()["data"] == []


def test_the_cluster_views_label_each_replica(local_cluster) -> None:
    cluster, client = local_cluster()
    for sid in ("ann", "bob"):
        assert turn(client, "hello", session_id=sid).status_code == 200
    memory = client.get("/v1/memory").json()
    budget = cluster.replicas[0].server.registry.pool.nbytes
    assert [r["pool"]["budget_bytes"] for r in memory["replicas"]] == [budget, budget]
    assert memory["pool"]["budget_bytes"] == 2 * budget
    assert sorted(s["replica"] for s in memory["sessions"]) == ["replica-0", "replica-1"]
    for r in memory["replicas"]:
        assert r["pool"]["used_bytes"] <= r["pool"]["budget_bytes"]
    metrics = client.get("/metrics").text
    for name in ("replica-0", "replica-1"):
        assert f'kvbound_kv_budget_bytes{{replica="{name}"}} {float(budget)}' in metrics
        assert f'kvbound_cluster_replica_up{{replica="{name}"}} 1.0' in metrics
    assert 'kvbound_cluster_routed_total{reason="placed",replica=' in metrics
    listed = client.get("/v1/sessions").json()["data"]
    assert sorted((s["id"], s["replica"]) for s in listed) == sorted(
        (s["id"], s["replica"]) for s in memory["sessions"])
    dashboard = client.get("/dashboard/data").json()
    assert dashboard["memory"]["cluster"]["up"] == 2 and dashboard["totals"]["generated_tokens"] == 8
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_streaming_and_errors_pass_through(local_cluster) -> None:
    cluster, client = local_cluster(api_key="k3y")
    auth = {"authorization": "Bearer k3y"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
            "session_id": "ann", "logit_bias": {"0": -100, "1": -100, "2": -100}}
    streamed = client.post("/v1/chat/completions", json=body, headers=auth)
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["kvbound"]["session_id"] == "ann"
    assert client.post("/v1/chat/completions", json=body).status_code == 401  # the replica checks the key
    assert client.get("/v1/memory").status_code == 401
    assert client.get("/health").status_code == 200  # the ingress's own, public
    bad = client.post("/v1/chat/completions", json={"messages": []}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    big = client.post("/v1/chat/completions", content=b"x" * ((4 << 20) + 1), headers=auth)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
