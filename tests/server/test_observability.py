"""GET /metrics (Prometheus text) and GET /v1/memory (JSON) agree with each other and with what the requests did;
every kvbound error type maps to its HTTP status."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvbound.errors import (ContextOverflowError, KvboundError, KVBudgetExceeded, MemoryBudgetExceeded,
                            ModelFormatError)
from kvbound.server.errors import ApiError, ServerBusy, SessionNotFound, api_error
from tests.server.conftest import NO_STOP

BLOCK_BYTES = 16384


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_and_memory_document_agree_with_the_requests(serve) -> None:
    server = serve(kv_budget=4 * BLOCK_BYTES)  # 128 tokens, so one long session crosses the KV thresholds
    client = server.openai()
    replies = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                              max_tokens=tokens, temperature=0,
                                              extra_body={"logit_bias": NO_STOP, "session_id": sid})
               for text, tokens, sid in (("a", 8, "m1"), ("b", 4, "m2"), ("c", 60, "m1"))]
    with server.http() as http:
        memory = http.get("/v1/memory").json()
        text = http.get("/metrics").text
    values = samples(text)

    assert set(memory) == {"process", "pool", "engine", "sessions", "store"} and memory["store"] is None
    pool = memory["pool"]
    assert pool["budget_bytes"] == 4 * BLOCK_BYTES and pool["blocks"] == 4 and pool["block_tokens"] == 32
    sessions = {s["id"]: s for s in memory["sessions"]}
    assert set(sessions) == {"m1", "m2"}
    assert pool["used_bytes"] == (pool["blocks"] - pool["free_blocks"]) * BLOCK_BYTES == \
        sum(s["kv_bytes"] for s in sessions.values())  # no system prompt, so no block is shared
    # m1's last turn needed the whole pool: idle m2 was offloaded (its messages kept, its KV given back).
    assert sessions["m2"]["state"] == "offloaded" and sessions["m2"]["memory"] is None
    assert sessions["m2"]["kv_bytes"] == 0 and sessions["m2"]["offloads"] == 1
    m1 = sessions["m1"]
    assert m1["state"] == "idle" and m1["turns"] == 2
    assert m1["memory"]["kv_used_bytes"] == m1["kv_bytes"] == 4 * BLOCK_BYTES
    assert m1["memory"]["tokens_held"] == m1["kv_tokens"] > 96
    assert m1["last_receipt"]["policy"] == "none" and m1["forecast"]
    for sid, session in sessions.items():
        assert values[("kvbound_session_kv_bytes", (("session", sid),))] == session["kv_bytes"]
    assert memory["process"]["weights_bytes"] > 0 and memory["process"]["rss_bytes"] > 0

    assert values[("kvbound_kv_budget_bytes", ())] == pool["budget_bytes"]
    assert values[("kvbound_kv_bytes_used", ())] == pool["used_bytes"]
    assert values[("kvbound_generated_tokens_total", ())] == sum(r.usage.completion_tokens for r in replies) == 72
    assert values[("kvbound_ttft_seconds_count", ())] == 3
    assert values[("kvbound_decode_tokens_per_second_count", ())] == 3
    assert values[("kvbound_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))] == 3
    assert values[("kvbound_sessions", (("state", "idle"),))] == 1
    assert values[("kvbound_sessions", (("state", "offloaded"),))] == 1
    assert values[("kvbound_session_offloads_total", ())] == 1
    assert values[("kvbound_active_sessions", ())] == 0
    assert values[("kvbound_process_rss_bytes", ())] > 0
    # m1 holds ~100 of the pool's 128 tokens: its KV crossed 80% and 95% of its budget once each.
    assert values[("kvbound_memory_events_total", (("level", "warning"),))] == 1
    assert values[("kvbound_memory_events_total", (("level", "critical"),))] == 1
    assert values[("kvbound_evicted_tokens_total", ())] == 0


def test_a_client_that_closes_mid_body_is_not_a_server_error(serve) -> None:
    """/metrics counts an abandoned request as 499 (client closed), never as a 500 the server did not have."""
    import socket
    import time
    from urllib.parse import urlparse

    server = serve()
    where = urlparse(server.url)
    for _ in range(3):
        with socket.create_connection((where.hostname, where.port), timeout=5) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 500\r\n\r\n{\"model\": \"tiny\", \"mess")
    deadline = time.monotonic() + 10
    while True:
        values = samples(httpx.get(server.url + "/metrics").text)
        closed = values.get(("kvbound_requests_total", (("route", "/v1/chat/completions"), ("status", "499"))), 0)
        if closed == 3 or time.monotonic() > deadline:
            break
    assert closed == 3
    assert ("kvbound_requests_total", (("route", "/v1/chat/completions"), ("status", "500"))) not in values


def test_evictions_are_counted(serve) -> None:
    server = serve(kv_budget=4 * BLOCK_BYTES, policy="window")
    for turn in range(3):
        assert httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": f"turn {turn}"}], "max_tokens": 50,
            "temperature": 0, "logit_bias": NO_STOP, "session_id": "w"}).status_code == 200
    values = samples(httpx.get(server.url + "/metrics").text)
    evicted = httpx.get(server.url + "/v1/sessions/w").json()["memory"]["tokens_evicted"]
    assert evicted > 0 and values[("kvbound_evicted_tokens_total", ())] == evicted


@pytest.mark.parametrize("error, status", [
    (ContextOverflowError("too long", needed=9, available=8), 413),
    (KVBudgetExceeded("no room", needed=9, available=8), 413),
    (MemoryBudgetExceeded("peak", needed=9, available=8, budget=10), 413),
    (ServerBusy("busy"), 429),
    (SessionNotFound("no session 'x'"), 404),
    (ValueError("top_p must be in (0, 1]"), 400),
    (KvboundError("bad"), 400),
    (ModelFormatError("broken file"), 500),
    (ApiError(409, "exists"), 409),
])
def test_error_types_map_to_statuses(error: Exception, status: int) -> None:
    mapped = api_error(error)
    assert mapped.status == status and str(error) in mapped.message


def test_unexpected_errors_hide_their_details() -> None:
    mapped = api_error(RuntimeError("secret internals at 0xdeadbeef"))
    assert mapped.status == 500 and "deadbeef" not in mapped.message and mapped.type == "server_error"
