"""Sessions keep their KV cache between requests: found by `session_id` or by the history a client resends; the
session API (create, list, read, delete, id checks); a client that leaves mid-reply leaves the session usable."""

from __future__ import annotations

import time

import httpx

from tests.server.conftest import NO_STOP

SYSTEM = {"role": "system", "content": "You are terse."}


def chat(server, messages, session_id=None, max_tokens=6, **options):
    """One non-streamed turn through the openai client; returns (completion, response headers)."""
    extra = {"logit_bias": NO_STOP, **({"session_id": session_id} if session_id else {})}
    raw = server.openai().chat.completions.with_raw_response.create(
        model="tiny", messages=messages, max_tokens=max_tokens, temperature=0, extra_body=extra, **options)
    return raw.parse(), raw.headers


def assistant(completion) -> dict:
    return {"role": "assistant", "content": completion.choices[0].message.content}


def test_resending_the_history_reuses_the_session(server) -> None:
    first_messages = [SYSTEM, {"role": "user", "content": "My name is Ann."}]
    first, headers = chat(server, first_messages)
    assert headers["x-kvbound-session-state"] == "new"
    session = headers["x-kvbound-session"]

    history = first_messages + [assistant(first), {"role": "user", "content": "What is my name?"}]
    second, headers = chat(server, history)
    assert headers["x-kvbound-session"] == session
    assert headers["x-kvbound-session-state"] == "reused"
    # The whole first turn stayed in the cache: prompt and reply tokens, none of them prefilled again.
    assert int(headers["x-kvbound-reused-tokens"]) == first.usage.total_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens
    extra = second.model_extra["kvbound"]
    assert extra["refed_history_tokens"] == 0 and extra["reprefilled_tokens"] == 0
    assert 0 < extra["prefilled_tokens"] < first.usage.prompt_tokens  # only the new message
    assert second.usage.prompt_tokens == first.usage.total_tokens + extra["prefilled_tokens"]


def test_a_changed_history_starts_another_session(server) -> None:
    first, headers = chat(server, [{"role": "user", "content": "Remember 42."}])
    edited = [{"role": "user", "content": "Remember 43."}, assistant(first), {"role": "user", "content": "Which?"}]
    second, second_headers = chat(server, edited)
    assert second_headers["x-kvbound-session"] != headers["x-kvbound-session"]
    assert second_headers["x-kvbound-session-state"] == "new"
    assert second.model_extra["kvbound"]["refed_history_tokens"] > 10  # the client's history, fed once
    assert second.usage.prompt_tokens_details.cached_tokens == 0


def test_explicit_session_takes_only_the_new_message(server) -> None:
    first, headers = chat(server, [SYSTEM, {"role": "user", "content": "Hi"}], session_id="explicit-1")
    assert headers["x-kvbound-session"] == "explicit-1" and headers["x-kvbound-session-state"] == "new"
    second, headers = chat(server, [{"role": "user", "content": "And then?"}], session_id="explicit-1")
    assert headers["x-kvbound-session-state"] == "reused"
    assert int(headers["x-kvbound-reused-tokens"]) == first.usage.total_tokens
    detail = httpx.get(server.url + "/v1/sessions/explicit-1").json()
    assert [m["role"] for m in detail["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert detail["messages"][3]["content"] == "And then?"
    assert detail["messages"][4]["content"] == second.choices[0].message.content
    assert detail["turns"] == 2 and detail["system"] == SYSTEM["content"]
    memory = detail["memory"]
    assert memory["tokens_held"] == detail["kv_tokens"] == first.usage.total_tokens + \
        second.model_extra["kvbound"]["prefilled_tokens"] + second.usage.completion_tokens
    assert memory["kv_used_bytes"] == detail["kv_bytes"] > 0
    assert detail["last_receipt"]["policy"] == "none" and "forecast" in detail


def test_explicit_session_with_a_different_history_is_rebuilt(server) -> None:
    chat(server, [{"role": "user", "content": "First"}], session_id="rebuild-1")
    other = [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "Next"}]
    reply, headers = chat(server, other, session_id="rebuild-1")
    assert headers["x-kvbound-session-state"] == "rebuilt"
    assert reply.model_extra["kvbound"]["refed_history_tokens"] > 0
    messages = httpx.get(server.url + "/v1/sessions/rebuild-1").json()["messages"]
    assert messages[:3] == other and messages[3]["role"] == "assistant"


def test_session_routes(server) -> None:
    with server.http() as http:
        created = http.post("/v1/sessions", json={"session_id": "crud-1", "system": "Be kind."})
        assert created.status_code == 201, created.text
        assert created.json()["id"] == "crud-1" and created.json()["messages"] == [
            {"role": "system", "content": "Be kind."}]
        assert http.post("/v1/sessions", json={"session_id": "crud-1"}).status_code == 409
        anonymous = http.post("/v1/sessions")
        assert anonymous.status_code == 201 and anonymous.json()["id"].startswith("sess-")
        listed = {s["id"]: s for s in http.get("/v1/sessions").json()["data"]}
        assert listed["crud-1"]["state"] == "idle" and listed["crud-1"]["turns"] == 0
        reply, headers = chat(server, [{"role": "user", "content": "Hello"}], session_id="crud-1")
        assert headers["x-kvbound-session-state"] == "new"
        assert http.get("/v1/sessions/crud-1").json()["messages"][0]["content"] == "Be kind."
        deleted = http.delete("/v1/sessions/crud-1")
        assert deleted.status_code == 200 and deleted.json() == {"id": "crud-1", "object": "session.deleted",
                                                                 "deleted": True}
        assert http.get("/v1/sessions/crud-1").status_code == 404
        assert http.delete("/v1/sessions/crud-1").status_code == 404
        assert "crud-1" not in {s["id"] for s in http.get("/v1/sessions").json()["data"]}


def test_session_ids_are_checked(server) -> None:
    with server.http() as http:
        for bad in ("bad.id", "a" * 65, "white space", "semi;colon"):
            response = http.get(f"/v1/sessions/{bad}")
            assert response.status_code == 400, (bad, response.text)
            assert response.json()["error"]["code"] == "invalid_session_id"
        assert http.get("/v1/sessions/..%2F..%2Fetc").status_code in (400, 404)
        assert http.get("/v1/sessions/unknown-session").status_code == 404
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "session_id": "../../etc"}
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == "session_id"


def test_client_leaving_mid_stream_rolls_the_turn_back(server) -> None:
    first, _ = chat(server, [{"role": "user", "content": "Start"}], session_id="leaver")
    before = httpx.get(server.url + "/v1/sessions/leaver").json()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Talk a lot"}], "max_tokens": 900,
            "stream": True, "temperature": 0, "logit_bias": NO_STOP, "session_id": "leaver"}
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    # The client is gone: the server stops generating and the Chat drops the half-written turn.
    deadline = time.monotonic() + 20
    while (now := httpx.get(server.url + "/v1/sessions/leaver").json())["state"] == "answering":
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.02)
    assert now["turns"] == before["turns"] == 1 and now["kv_tokens"] == before["kv_tokens"]
    assert now["messages"] == before["messages"]
    assert server.memory()["pool"]["reserved_blocks"] == 0
    reply, headers = chat(server, [{"role": "user", "content": "Still there?"}], session_id="leaver")
    assert headers["x-kvbound-session-state"] == "reused"
    assert int(headers["x-kvbound-reused-tokens"]) == before["kv_tokens"] == first.usage.total_tokens
    assert reply.usage.completion_tokens == 6


def test_named_sessions_cannot_lock_out_chats_without_a_session_id(serve) -> None:
    """Without a store, named sessions may take 7/8 of --max-sessions: past that, creating one is a 429 with the
    numbers, and a chat without a session_id is still answered."""
    server = serve(max_sessions=8, sessions_per_client=8)
    codes = [httpx.post(server.url + "/v1/sessions", json={"session_id": f"n{i}"}).status_code for i in range(8)]
    assert codes == [201] * 7 + [429]
    refused = httpx.post(server.url + "/v1/sessions", json={"session_id": "n9"}).json()["error"]["message"]
    assert "7 named sessions" in refused and "--data-dir" in refused
    for text in ("anyone there?", "still there?"):
        completion, _ = chat(server, [{"role": "user", "content": text}])
        assert completion.choices[0].message.content


def test_one_client_naming_many_sessions_does_not_lock_out_another(serve) -> None:
    """300 session creations by one client (its API key) stop at its quota with a 429 that says so; another
    client can still name a session and chat in it, and so can a chat without a session id."""
    server = serve(max_sessions=16)  # 14 named slots, 7 per client by default
    greedy = {"Authorization": "Bearer greedy"}
    codes = [httpx.post(server.url + "/v1/sessions", json={"session_id": f"g{i}"}, headers=greedy).status_code
             for i in range(300)]
    assert codes[:7] == [201] * 7 and set(codes[7:]) == {429}
    refused = httpx.post(server.url + "/v1/sessions", json={"session_id": "g-more"}, headers=greedy).json()
    assert "its quota" in refused["error"]["message"] and "--sessions-per-client 7" in refused["error"]["message"]
    other = {"Authorization": "Bearer other"}
    assert httpx.post(server.url + "/v1/sessions", json={"session_id": "mine"}, headers=other).status_code == 201
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "session_id": "mine2"}
    answer = httpx.post(server.url + "/v1/chat/completions", json=body, headers=other, timeout=60)
    assert answer.status_code == 200, answer.text
    completion, _ = chat(server, [{"role": "user", "content": "anyone there?"}])
    assert completion.choices[0].message.content
