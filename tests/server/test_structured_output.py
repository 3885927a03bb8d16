"""response_format through the openai client against a real uvicorn: json_schema replies that validate against
their schema (the default model over many prompts, streamed and not), json_object replies that parse, on chat and
text completions; and a chat of a lone system or developer message, answered and continued."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance", reason="structured output needs llguidance: pip install -e '.[serve]'")
jsonschema = pytest.importorskip("jsonschema")

from tests.server.conftest import NO_STOP  # noqa: E402

# Every string and number bounded, so a document fits the max_tokens given: each reply must be complete.
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "hobbies"],
          "properties": {"name": {"type": "string", "maxLength": 30},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "hobbies": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 20}}}}
CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30},
                       "population": {"type": "integer", "minimum": 0, "maximum": 99999999}}}
REVIEW = {"type": "object", "additionalProperties": False, "required": ["sentiment", "stars", "summary"],
          "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                         "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                         "summary": {"type": "string", "maxLength": 40}}}
PROMPTS = [
    (PERSON, "Describe Marie Curie."), (PERSON, "Invent a character for a fantasy novel."),
    (PERSON, "Who is your favourite athlete?"), (PERSON, "Tell me about a retired teacher who loves gardens."),
    (CITY, "Tell me about Paris."), (CITY, "Which city is the capital of Japan?"),
    (CITY, "Describe a small town in Norway."), (CITY, "What do you know about Cairo?"),
    (REVIEW, "Review: the pizza was cold and the waiter rude."), (REVIEW, "Review: best concert of my life!"),
    (REVIEW, "Review: the hotel was fine, nothing special."), (REVIEW, "Review: I loved this book's ending."),
]
PERSON_TINY = {"type": "object", "additionalProperties": False, "required": ["name", "pet"],
               "properties": {"name": {"type": "string", "maxLength": 8}, "pet": {"enum": ["cat", "dog"]}}}


def response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}


def ask(client, messages, stream: bool, **options) -> tuple[str, str]:
    """(content, finish_reason) of one chat completion, streamed or not."""
    if not stream:
        choice = client.chat.completions.create(model="default", messages=messages, **options).choices[0]
        return choice.message.content, choice.finish_reason
    chunks = [c for c in client.chat.completions.create(model="default", messages=messages, stream=True, **options)
              if c.choices]
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


# -- the tiny random-weight model: the whole path in seconds ---------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_replies_validate_even_from_random_weights(server, stream) -> None:
    client = server.openai()
    for seed in range(4):
        text, finish = ask(client, [{"role": "user", "content": f"pet {seed}"}], stream, max_tokens=60,
                           temperature=1.0, seed=seed, response_format=response_format(PERSON_TINY))
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON_TINY)


def test_text_completions_take_response_format_too(server) -> None:
    with server.http() as http:
        body = http.post("/v1/completions", json={"model": "default", "prompt": "x", "max_tokens": 60, "seed": 1,
                                                  "temperature": 1.0, "response_format": response_format(PERSON_TINY)
                                                  }).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(body["choices"][0]["text"]), PERSON_TINY)


def test_text_response_format_and_tool_choice_none_change_nothing(server) -> None:
    client = server.openai()
    messages = [{"role": "user", "content": "hi"}]
    plain = ask(client, messages, False, max_tokens=8, temperature=0, logit_bias=NO_STOP)
    same = ask(client, messages, False, max_tokens=8, temperature=0, logit_bias=NO_STOP,
               response_format={"type": "text"}, tool_choice="none")
    assert same == plain


@pytest.mark.parametrize("role", ["system", "developer"])
def test_a_lone_system_or_developer_message_is_answered_and_continued(server, role) -> None:
    client = server.openai()
    messages = [{"role": role, "content": "Greet the user warmly."}]
    raw = client.chat.completions.with_raw_response.create(model="default", messages=messages, max_tokens=6,
                                                          temperature=0, logit_bias=NO_STOP)
    reply = raw.parse()
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "length"
    template = server.state.llm.tokenizer
    rendered = template.apply_chat_template([{"role": "system", "content": "Greet the user warmly."}])
    assert reply.usage.prompt_tokens == len(template.encode(rendered))  # the system prompt, then the reply's turn
    messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                 {"role": "user", "content": "Thanks!"}]
    again = client.chat.completions.with_raw_response.create(model="default", messages=messages, max_tokens=4,
                                                            temperature=0, logit_bias=NO_STOP)
    assert again.headers["x-kvbound-session"] == raw.headers["x-kvbound-session"]
    assert again.headers["x-kvbound-session-state"] == "reused"


# -- the default model -------------------------------------------------------------------------------------------
@pytest.mark.model
def test_json_schema_over_many_prompts_streamed_and_not(smollm2_server) -> None:
    client = smollm2_server.openai()
    failures = []
    for k, (schema, prompt) in enumerate(PROMPTS):
        text, finish = ask(client, [{"role": "system", "content": "Answer in JSON."},
                                    {"role": "user", "content": prompt}], stream=k % 2 == 1, max_tokens=200,
                           temperature=0.7, seed=k, response_format=response_format(schema))
        try:
            assert finish == "stop"
            jsonschema.validate(json.loads(text), schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            failures.append(f"{prompt!r}: {finish} {text!r} ({e})")
    assert not failures, "\n".join(failures)


@pytest.mark.model
def test_json_object_replies_parse_and_a_cut_one_says_length(smollm2_server) -> None:
    client = smollm2_server.openai()
    system = {"role": "system", "content": "Answer in JSON."}
    for k, prompt in enumerate(["What is the capital of France?", "Give the name and age of a fictional person.",
                                "What is 2+2?"]):
        text, finish = ask(client, [system, {"role": "user", "content": prompt}], stream=k == 1, max_tokens=100,
                           temperature=0, response_format={"type": "json_object"})
        assert finish == "stop", text
        assert isinstance(json.loads(text), dict) and text != "{}"
    # The grammar guarantees the syntax of what is written, not that max_tokens leaves room to finish it.
    text, finish = ask(client, [system, {"role": "user", "content": "List three fruits with their colours."}],
                       stream=False, max_tokens=10, temperature=0, response_format={"type": "json_object"})
    assert finish == "length" and text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.model
def test_a_lone_system_message_gets_a_reply(smollm2_server) -> None:
    reply = smollm2_server.openai().chat.completions.create(
        model="default", messages=[{"role": "system", "content": "You are a pirate. Greet the user."}],
        max_tokens=24, temperature=0)
    assert len(reply.choices[0].message.content.split()) >= 3
