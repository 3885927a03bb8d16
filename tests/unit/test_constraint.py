"""Structured output (engine/constraint.py): the mask a JSON schema puts on each step, the choice a Decoder makes
under it (an allowed token over a likelier forbidden one), the stop when the document is whole, an honest
"length" when max_new_tokens cuts it, bad schemas and logit_bias ids refused by name; and the same through the
public API on a tiny random-weight model (chat, raw completion, batched decoding) and a chat that answers its
system prompt alone."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llguidance", reason="structured output needs llguidance: pip install -e '.[serve]'")
jsonschema = pytest.importorskip("jsonschema")

import kvbound  # noqa: E402
from kvbound.engine import batch  # noqa: E402
from kvbound.engine.constraint import JsonConstraint  # noqa: E402
from kvbound.engine.generate import Decoder  # noqa: E402
from kvbound.engine.sampler import SamplingParams, sampling_params  # noqa: E402
from kvbound.tokenizer import Tokenizer  # noqa: E402
from tests.helpers_tiny import save_hf_dir, tiny_hf_model, tiny_tokenizer  # noqa: E402

FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False}
# Every string bounded, so the whole document fits a known number of tokens: a generation must complete.
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pet": {"enum": ["cat", "dog", "none"]}},
          "required": ["name", "age", "pet"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> kvbound.LLM:
    torch.set_num_threads(1)
    return kvbound.load(save_hf_dir(tiny_hf_model("llama"), tmp_path_factory.mktemp("tiny")), device="cpu")


def allowed_texts(constraint: JsonConstraint, tokenizer: Tokenizer) -> set[str]:
    masked = constraint.mask(torch.zeros(tokenizer.vocab_size))
    return {tokenizer.decode([i]) for i in torch.isfinite(masked).nonzero().flatten().tolist()}


def test_the_mask_allows_what_the_schema_allows_next(tokenizer) -> None:
    constraint = JsonConstraint(FLAG, tokenizer)
    assert allowed_texts(constraint, tokenizer) == {"{"}  # no whitespace before the document
    for token in tokenizer.encode('{"ok": '):
        constraint.advance(token)
    allowed = allowed_texts(constraint, tokenizer)
    assert {"t", "f"} <= allowed
    assert all("true".startswith(t) or "false".startswith(t) for t in allowed), allowed
    for token in tokenizer.encode("true"):
        constraint.advance(token)
    assert allowed_texts(constraint, tokenizer) == {"}"} and not constraint.complete
    constraint.advance(tokenizer.encode("}")[0])
    assert constraint.complete
    assert tokenizer.token_to_id("x") not in torch.isfinite(constraint.mask(torch.zeros(128))).nonzero()


def test_a_masked_token_cannot_be_taken(tokenizer) -> None:
    constraint = JsonConstraint(FLAG, tokenizer)
    with pytest.raises(ValueError, match="does not continue the text the json_schema allows"):
        constraint.advance(tokenizer.token_to_id("x"))


def drive(tokenizer: Tokenizer, params: SamplingParams, prefer: str) -> Decoder:
    """A greedy Decoder fed hand-made logits (no model): a forbidden 'x' always likeliest, then `prefer`'s tokens."""
    logits = torch.zeros(tokenizer.vocab_size)
    logits[tokenizer.encode(prefer)] = 5.0
    logits[tokenizer.token_to_id("x")] = 10.0
    decoder = Decoder(None, tokenizer, None, logits, params, [])
    while not decoder.done:
        decoder.feed(logits)
    return decoder


@pytest.mark.parametrize("prefer", ["false", "true"])
def test_the_decoder_takes_the_likeliest_allowed_token_and_stops_when_the_document_is_whole(tokenizer, prefer):
    params = sampling_params(temperature=0.0, max_new_tokens=50, json_schema=FLAG)
    result = drive(tokenizer, params, prefer).result
    assert result.text == '{"ok": ' + prefer + "}"
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] not in tokenizer.stop_ids  # stopped by the grammar, not by an end token
    assert tokenizer.decode(result.token_ids) == result.text
    unconstrained = drive(tokenizer, sampling_params(temperature=0.0, max_new_tokens=5), prefer).result
    assert unconstrained.text == "xxxxx"


def test_max_new_tokens_cuts_a_document_with_finish_reason_length(tokenizer) -> None:
    result = drive(tokenizer, sampling_params(temperature=0.0, max_new_tokens=3, json_schema=FLAG), "true").result
    assert result.finish_reason == "length" and len(result.token_ids) == 3
    assert '{"ok": true}'.startswith(result.text)


def test_bad_schemas_and_logit_bias_ids_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="not a valid JSON schema: Invalid type: wat"):
        sampling_params(json_schema={"type": "wat"})
    with pytest.raises(ValueError, match="unclosed group"):
        sampling_params(json_schema={"type": "string", "pattern": "("})
    with pytest.raises(ValueError, match="must be a JSON schema object"):
        sampling_params(json_schema='{"type": "object"}')
    with pytest.raises(ValueError, match="token 12, outside the vocabulary of 10 tokens"):
        sampling_params(vocab_size=10, logit_bias={3: 1.0, 12: 1.0})
    assert sampling_params(vocab_size=10, logit_bias={9: 1.0}).logit_bias == {9: 1.0}


def test_a_logit_bias_that_bans_every_allowed_token_is_an_error(tokenizer) -> None:
    banned = {tokenizer.token_to_id("{"): float("-inf")}
    with pytest.raises(ValueError, match="bans every token"):
        drive(tokenizer, sampling_params(temperature=0.0, json_schema=FLAG, logit_bias=banned), "true")


def test_chat_raw_and_batched_generations_follow_the_schema(llm) -> None:
    chat = llm.chat(system="Answer in JSON.")
    reply = chat.send("Who are you?", json_schema=PERSON, temperature=1.0, seed=3, max_new_tokens=80)
    assert reply.finish_reason == "stop"
    jsonschema.validate(json.loads(reply.text), PERSON)
    follow = chat.send("And then?", temperature=1.0, seed=4, max_new_tokens=4)  # the chat goes on after it
    assert follow.reprefilled_tokens == 0
    raw = llm.generate("data:", raw=True, json_schema={"type": "object"}, temperature=0.0, max_new_tokens=60)
    assert raw.finish_reason in ("stop", "length")
    if raw.finish_reason == "stop":
        assert isinstance(json.loads(raw.text), dict)
    # A batch of decoders: each follows its own schema (or none) in one forward per step.
    turns = [llm.chat().start(f"person {i}", json_schema=PERSON, temperature=1.0, seed=i, max_new_tokens=80)
             for i in range(3)] + [llm.chat().start("free text", temperature=1.0, seed=9, max_new_tokens=20)]
    batch.drive([t.decoder for t in turns])
    replies = [t.commit() for t in turns]
    for reply in replies[:3]:
        assert reply.finish_reason == "stop"
        jsonschema.validate(json.loads(reply.text), PERSON)
    assert len(replies[3].token_ids) == 20 or replies[3].finish_reason == "stop"


def test_a_chat_answers_its_system_prompt_alone(llm) -> None:
    chat = llm.chat(system="Greet the user.")
    no_stop = {0: float("-inf"), 1: float("-inf"), 2: float("-inf")}  # the tiny vocab's special tokens
    reply = chat.send(None, temperature=0.0, max_new_tokens=6, logit_bias=no_stop)
    assert reply.token_ids and [m["role"] for m in chat.messages] == ["system", "assistant"]
    rendered = llm.tokenizer.apply_chat_template([{"role": "system", "content": "Greet the user."}])
    assert reply.prompt_tokens == len(llm.tokenizer.encode(rendered))  # the system prompt + the generation prompt
    second = chat.send("Thanks!", temperature=0.0, max_new_tokens=4)
    assert second.reprefilled_tokens == 0
    assert [m["role"] for m in chat.messages] == ["system", "assistant", "user", "assistant"]
    with pytest.raises(ValueError, match="no message to answer"):
        chat.send(None)
    with pytest.raises(ValueError, match="no message to answer"):
        llm.chat().send(None)


def test_a_lark_grammar_constrains_a_reply_as_a_schema_does(llm) -> None:
    for seed in range(3):
        reply = llm.generate("yes or no?", grammar='start: "yes" | "no" | "maybe so"', temperature=1.0, seed=seed,
                             max_new_tokens=20)
        assert reply.text in ("yes", "no", "maybe so") and reply.finish_reason == "stop"
    with pytest.raises(ValueError, match='unknown name: "answer"'):
        sampling_params(grammar="start: answer")
    with pytest.raises(ValueError, match="json_schema or grammar, not both"):
        sampling_params(grammar='start: "a"', json_schema=FLAG)
